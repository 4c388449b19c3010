"""Scoring inside the training loop: the rewards of every rolled-out group, from every rank, with the judge kept honest.

train.py makes two calls per step: `submit(trajectory, step)` after each group's rollout, and `gather(step)`, which
returns the step's rewards. Behind them:
- overlap: with an HTTP judge (`--judge_overlap`, the default) a group is scored in a thread while the GPU rolls out
  the next one. The judge answers a request the same whenever it comes, so the rewards, and the LoRA, are those of
  scoring each group right after its rollout (test_train.py checks it bit for bit). A local judge shares the GPU
  and scores in the main thread.
- gathering: every rank's rewards in image order (parallel.all_gather), so advantages use one process's statistics.
- accounting: a step in which the judge answered none of its requests, on any rank, holds fallback rewards alone:
  gather says so (Scores.answered) and train.py does not train on it. After --judge_max_failed_steps such steps in
  a row, or when the run's last step is one, gather raises runs.Stop: train.py saves the state after the last
  trained step and stops with one line, and --resume_from_checkpoint latest goes on once the judge answers.
  A reward reports what its judge answered as info["judge/answered"] (reward.vlm_reward does); a reward without
  that key is taken as answered.
- the judge: load_judge builds the one named on the command line, always, or the default one when the reward
  declares that it scores with a judge (reward.uses_judge); the reward receives it as judge=.

    python -c "import scoring; help(scoring.Scoring)"
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import parallel
import reward
import runs


def load_judge(args, rewards, device, dtype, pipeline=None, concurrency=16):
    """The judge of --judge, --judge_url, --judge_model and --prompts_dir, checked now, before the expensive model
    load; or None when no judge is named and none of `rewards` (reward functions) uses one. The kind defaults to
    http when --judge_url is given, else local (reward.DEFAULT_JUDGE unless --judge_model). --judge text_encoder is
    the pipeline's own text encoder: None until `pipeline` is given."""
    if args.judge is None and args.judge_url is None and not any(reward.needs_judge(fn) for fn in rewards):
        return None
    kind = args.judge or ("http" if args.judge_url else "local")
    if kind == "text_encoder" and pipeline is None:
        return None
    cuda = str(device).startswith("cuda")
    options = (
        {
            "local": {"device": device, "dtype": dtype, "offload": getattr(args, "judge_offload", False) and cuda},
            "http": {"api_key_env": getattr(args, "judge_api_key_env", "OPENAI_API_KEY"), "concurrency": concurrency},
            "text_encoder": {"pipeline": pipeline},
        }[kind]
        if kind != "tiny"
        else {}
    )
    return reward.load_judge(
        kind,
        model=args.judge_model or (reward.DEFAULT_JUDGE if kind == "local" else None),
        url=args.judge_url,
        prompts_dir=args.prompts_dir,
        **options,
    )


@dataclass
class Scores:
    """One step's scoring, every rank's, in image order."""

    rewards: torch.Tensor  # (images_per_step * G,) float32
    answered: bool  # the judge answered at least one request of the step (always True without a judge)
    metrics: dict  # the rewards' info numbers, each the mean over the step's groups: reward/<key> or its own a/b name
    candidates: list = field(default_factory=list)  # per-candidate scores of this rank's first group (the picture)
    reward_s: float = 0.0  # seconds spent in the reward on this rank (overlapping the rollouts when threaded)


class Scoring:
    """Scores each submitted group with reward_fn(images, layers, G, judge=judge, seed=step); see the module doc.
    overlap: score in `threads` threads (an HTTP judge), each with one torch thread (their own OpenMP teams would
    outnumber the cores the rollouts use). `timer` (runs.Timer) counts the main thread's waits as judge_wait."""

    def __init__(
        self, reward_fn, judge, group_size, timer, overlap=False, threads=1, max_failed_steps=1, last_step=None
    ):
        self.reward_fn, self.judge, self.group_size, self.timer = reward_fn, judge, group_size, timer
        self.max_failed_steps, self.last_step, self.failed_steps = max_failed_steps, last_step, 0
        self.pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) if overlap else None
        self.pending = []

    def _score(self, traj, step):  # -> (rewards (G,), info, seconds)
        t = time.perf_counter()
        rewards, info = self.reward_fn(traj.images, traj.layers, self.group_size, judge=self.judge, seed=step)
        return torch.as_tensor(rewards, dtype=torch.float32), info, time.perf_counter() - t

    def submit(self, traj, step):
        """Start scoring one group: in a thread (overlap), or now, which is time the GPU waits for the judge."""
        with self.timer("judge_wait"):
            self.pending.append(self.pool.submit(self._score, traj, step) if self.pool else self._score(traj, step))

    def gather(self, step):
        """Wait for this rank's groups, gather every rank's (a collective: every rank calls it) and account for
        the judge. Returns Scores; raises runs.Stop when the judge has answered nothing for too long."""
        with self.timer("judge_wait"):
            mine = [p.result() if self.pool else p for p in self.pending]
        self.pending = []
        rewards = torch.cat(parallel.all_gather(torch.cat([r for r, _, _ in mine])))
        infos = sum(
            parallel.all_gather([{k: v for k, v in info.items() if k != "candidates"} for _, info, _ in mine]), []
        )
        counted = [i["judge/answered"] for i in infos if "judge/answered" in i]
        answered = self.judge is None or not counted or sum(counted) > 0
        self.failed_steps = 0 if answered else self.failed_steps + 1
        if not answered:
            tqdm.write(f"step {step + 1}: the judge answered none of its requests; the step is not trained")
        if self.failed_steps >= self.max_failed_steps or (self.failed_steps and step + 1 == self.last_step):
            errors = [i["judge_last_error"] for i in infos if i.get("judge_last_error")]
            trained = step + 1 - self.failed_steps
            raise runs.Stop(
                f"the judge {self.judge.name} answered none of its requests in {self.failed_steps} "
                f"step(s) in a row (steps {trained + 1}..{step + 1}, not trained); last error: "
                f"{errors[-1] if errors else 'none reported'}.",
                trained,
                "once the judge answers",
            )
        numbers = [k for k, v in infos[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics = {k if "/" in k else f"reward/{k}": sum(i[k] for i in infos) / len(infos) for k in numbers}
        return Scores(rewards, answered, metrics, mine[0][1].get("candidates", []), sum(s for _, _, s in mine))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:
            self.pool.shutdown(cancel_futures=True)
