"""Scoring inside the training loop: the rewards of every rolled-out group, from every rank, the judge kept honest.

train.py makes two calls per step: `submit(trajectory, step, seed)` after each group's rollout, and `gather(step)`,
which returns the step's rewards. Behind them:
- the call: `call_reward` checks what a reward returns, (rewards (G,), info dict) with finite rewards, and stops the
  run with one line naming the reward otherwise;
- overlap: with an HTTP judge (`--judge_overlap`, the default) a group is scored in a thread while the GPU rolls out
  the next one. The judge answers a request the same whenever it comes, so the rewards, and the LoRA, are those of
  scoring each group right after its rollout (tests/test_train.py checks it bit for bit). A local judge shares the
  GPU and scores in the main thread.
- gathering: every rank's rewards in image order (parallel.all_gather), so advantages use one process's statistics.
- accounting: a step in which the judge answered none of its requests, on any rank, holds fallback rewards alone:
  gather says so (Scores.answered) and train.py does not train on it. After --judge_max_failed_steps such steps in
  a row, or when the run's last step is one, gather raises tracking.Stop: train.py saves the state after the last
  trained step and stops with one line, and --resume_from_checkpoint latest goes on once the judge answers.
  A reward reports what its judge answered as info["judge/answered"] (reward.vlm_reward does); a reward without
  that key is taken as answered.
"""

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from support import parallel
from support.cli import InputError
from support.tracking import Stop


def call_reward(fn, what, images, layers, group_size, **kwargs):
    """rewards, info = fn(images, layers, group_size, **kwargs), checked: rewards must be B = len(images) x group_size
    finite numbers (a (B,) tensor, array or list) and info a dict; anything else raises InputError naming the reward
    (`what`: how the command line gave it, e.g. "--reward my.py:fn") and what it returned. Returns (rewards (B,)
    float32 CPU, info)."""
    B = len(images) * group_size
    out = fn(images, layers, group_size, **kwargs)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise InputError(
            f"{what} returned {_describe(out)}; a reward returns a pair (rewards of shape ({B},), info dict)"
        )
    rewards, info = out
    try:
        rewards = torch.as_tensor(rewards, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} returned rewards {_describe(rewards)}; give {B} numbers, shape ({B},)") from None
    if tuple(rewards.shape) != (B,):
        raise InputError(
            f"{what} returned rewards of shape {tuple(rewards.shape)}; give shape ({B},): one per candidate "
            f"({len(images)} image(s) x group_size {group_size})"
        )
    if not torch.isfinite(rewards).all():
        bad = [i for i, r in enumerate(rewards.tolist()) if not math.isfinite(r)]
        raise InputError(f"{what} returned non-finite rewards at rows {bad[:8]}: {rewards[bad[:8]].tolist()}")
    if not isinstance(info, dict):
        raise InputError(f"{what} returned info {_describe(info)}; give a dict (empty is fine) of numbers to log")
    return rewards, info


def _describe(value):
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else f" ({value!r:.60})")


@dataclass
class Scores:
    """One step's scoring, every rank's, in image order."""

    rewards: torch.Tensor  # (images_per_step * G,) float32
    answered: bool  # the judge answered at least one request of the step (always True without a judge)
    metrics: dict  # the rewards' info numbers, each the mean over the step's groups: reward/<key> or its own a/b name
    candidates: list = field(default_factory=list)  # per-candidate scores of this rank's first group (the picture)
    reward_s: float = 0.0  # seconds spent in the reward on this rank (overlapping the rollouts when threaded)


class Scoring:
    """Scores each submitted group with reward_fn(images, layers, G, judge=judge, seed=seed, **reward_args); see the
    module doc; `name` is how the command line gave the reward (errors name it). overlap: score in `threads` threads
    (an HTTP judge), each with one torch thread (their own OpenMP teams would outnumber the cores the rollouts use).
    `timer` (tracking.Timer) counts the main thread's waits as judge_wait."""

    def __init__(
        self,
        reward_fn,
        name,
        judge,
        group_size,
        timer,
        reward_args=None,
        overlap=False,
        threads=1,
        max_failed_steps=1,
        last_step=None,
    ):
        self.reward_fn, self.name, self.judge, self.group_size, self.timer = reward_fn, name, judge, group_size, timer
        self.reward_args = reward_args or {}
        self.max_failed_steps, self.last_step, self.failed_steps = max_failed_steps, last_step, 0
        self.pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) if overlap else None
        self.pending = []

    def _score(self, traj, seed):  # -> (rewards (G,), info, seconds)
        t = time.perf_counter()
        rewards, info = call_reward(
            self.reward_fn,
            f"--reward {self.name}",
            traj.images,
            traj.layers,
            self.group_size,
            judge=self.judge,
            seed=seed,
            **self.reward_args,
        )
        return rewards, info, time.perf_counter() - t

    def submit(self, traj, step, seed):
        """Start scoring one group of step `step` (`seed`: its own, e.g. the grid order): in a thread (overlap), or
        now, which is time the GPU waits for the judge."""
        with self.timer("judge_wait"):
            self.pending.append(self.pool.submit(self._score, traj, seed) if self.pool else self._score(traj, seed))

    def gather(self, step):
        """Wait for this rank's groups, gather every rank's (a collective: every rank calls it) and account for
        the judge. Returns Scores; raises tracking.Stop when the judge has answered nothing for too long."""
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
            raise Stop(
                f"the judge {self.judge.name} answered none of its requests in {self.failed_steps} "
                f"step(s) in a row (steps {trained + 1}..{step + 1}, not trained); last error: "
                f"{errors[-1] if errors else 'none reported'}.",
                trained,
                "once the judge answers",
            )
        numbers = [
            k
            for k, v in infos[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(k in i for i in infos)
        ]
        metrics = {k if "/" in k else f"reward/{k}": sum(i[k] for i in infos) / len(infos) for k in numbers}
        return Scores(rewards, answered, metrics, mine[0][1].get("candidates", []), sum(s for _, _, s in mine))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool:  # on an error or Ctrl-C, what is queued is dropped and no running request is waited for
            self.pool.shutdown(wait=exc[0] is None, cancel_futures=True)
