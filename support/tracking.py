"""What a training run shows while it runs, and how it stops: metrics and trackers, timers, memory, one-line stops.

train.py, distill.py and sft.py share these, so each exists once:
- RunLog: metrics.jsonl (always, one JSON object per step) and the tracker of --report_to (tensorboard or wandb),
  which gets the same scalars and the sample pictures (written to OUT/samples/ as PNGs too);
- Timer: seconds per phase of a step (time/<phase>_s), and the phase an out-of-memory error names;
- memory_figures: mem/peak_gb (and mem/reserved_gb on CUDA);
- guard, around the training loop: its ways to stop with one line and a resumable state (a judge that answers
  nothing: Stop; CUDA out of memory; a reward that returns the wrong thing; Ctrl-C and SIGTERM).
"""

import json
import resource
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from support import parallel
from support.cli import InputError, fail
from support.runfolder import checkpoints, resume_command, run_step

REPORT_TO = ("tensorboard", "wandb", "none")


def add_run_flags(parser, output_dir, max_train_steps, checkpointing_steps, sample_every=None):
    """A training script's run flags, one definition for train.py, sft.py and distill.py: where the run writes, how
    long it runs, what it keeps, how it resumes and how it is watched; each script gives its own defaults."""
    a = parser.add_argument
    a("--output_dir", default=output_dir, help="the run's folder: metrics.jsonl, logs/, checkpoints, the final LoRA")
    a("--max_train_steps", type=int, default=max_train_steps, help="optimizer steps (the loop's bound)")
    a("--checkpointing_steps", type=int, default=checkpointing_steps, help="save a checkpoint every N steps")
    a("--checkpoints_total_limit", type=int, default=3, help="keep at most this many checkpoints")
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")
    if sample_every is not None:
        a("--sample_every", type=int, default=sample_every, help="write a PNG of one group every N steps (0 = never)")
    a(
        "--report_to",
        choices=REPORT_TO,
        default="tensorboard",
        help="tracker for the scalars and sample pictures (metrics.jsonl is always written); tensorboard: "
        "`tensorboard --logdir OUTPUT_DIR/logs`",
    )


# ----------------------------------------------------------------------------- metrics and trackers
class RunLog:
    """metrics.jsonl (always) plus the --report_to tracker. log(record) writes one step's scalars to both;
    sample(picture, step) writes OUT/samples/step-<step>.png and sends it to the tracker."""

    def __init__(self, output_dir, report_to="tensorboard", config=None, project="stable-layers"):
        self.output_dir = Path(output_dir)
        self.tb = self.wandb = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError(
                    "--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                    "(or --report_to none)"
                ) from None
            self.tb = SummaryWriter(log_dir=str(self.output_dir / "logs"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise InputError(
                    "--report_to wandb needs the wandb package: pip install wandb (or --report_to none)"
                ) from None
            self.wandb = wandb.init(
                project=project,
                dir=str(self.output_dir),
                config=config or {},
                name=self.output_dir.name,
                resume="allow",
            )
        elif report_to != "none":
            raise InputError(f"--report_to {report_to!r}: choose one of {', '.join(REPORT_TO)}")
        self.file = open(self.output_dir / "metrics.jsonl", "a")

    def log(self, record):
        """record: {"step": int, name: number or list, ...}; numbers also go to the tracker at that step."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def step(self, record, timer, device, save=None):
        """The step's row: record with its times (timer.figures) and memory; save(step, record) first, when given,
        so the row holds the checkpoint's time/checkpoint_s and the checkpoint's model card the row's metrics."""
        if save is not None:
            with timer("checkpoint"):
                save(record["step"], record)
        self.log({**record, **timer.figures(), **memory_figures(device)})

    def sample(self, picture, step, tag="samples/group"):
        """The step's sample picture: OUT/samples/step-<step>.png, and the tracker's image `tag`."""
        path = self.output_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
        if self.tb is not None:
            self.tb.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(picture)}, step=step)
        return path

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Timer:
    """Seconds spent in each phase of a step, logged as time/<phase>_s, and the phase running now, which an
    out-of-memory error names (a phase that raises stays the current one). `with timer("rollout"): ...`;
    figures() returns the step's, with time/step_s since the previous call, and starts the next step."""

    def __init__(self):
        self.phase, self.seconds, self.start = "setup", {}, time.perf_counter()

    @contextmanager
    def __call__(self, phase):
        outer, self.phase, t = self.phase, phase, time.perf_counter()
        yield
        if t >= self.start:  # a phase that was running when figures() was taken counts in neither step
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t
        self.phase = outer

    def figures(self):
        now = time.perf_counter()
        out = {**{f"time/{k}_s": v for k, v in self.seconds.items()}, "time/step_s": now - self.start}
        self.seconds, self.start = {}, now
        return out


def memory_figures(device):
    """mem/peak_gb since the last call: GPU memory allocated at its peak (and mem/reserved_gb), or on the CPU the
    process's peak resident set (which never resets)."""
    if not str(device).startswith("cuda"):
        return {"mem/peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    out = {
        "mem/peak_gb": torch.cuda.max_memory_allocated() / 2**30,
        "mem/reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
    }
    torch.cuda.reset_peak_memory_stats()
    return out


# ----------------------------------------------------------------------------- stopping with a resumable state
class Stop(Exception):
    """The run cannot go on for now (a judge that answers nothing): the message says why; `guard` saves the state
    after step `trained` and stops every rank with one line that ends with how to go on (`hint`)."""

    def __init__(self, message, trained, hint):
        super().__init__(message)
        self.trained, self.hint = trained, hint


class Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, `kill`), raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _terminate(signum, frame):
    raise Terminated()


@contextmanager
def guard(output_dir, timer, save, close):
    """Around the training loop, its ways to stop with one line and a resumable state; close() runs first (the
    progress bar, the folder's claim), so the line stands alone and the folder is free:
    - Stop (exit 2): rank 0 writes checkpoint-<trained> with save(trained) unless it exists, every rank waits for it
      (no rank may exit, and so make torchrun stop the others, before it is written), then every rank stops;
    - CUDA out of memory (exit 2): the line names the phase (timer.phase), the flags that lower it and the checkpoint
      to resume from;
    - InputError (exit 2): bad input found in the loop, e.g. a reward that returns the wrong thing;
    - Ctrl-C (exit 130) and SIGTERM (exit 143): the step reached, the last checkpoint, the command that goes on.
    Any other exception is a bug and keeps its traceback (close() runs first here too)."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except Stop as stop:
        if parallel.rank() == 0 and not (Path(output_dir) / f"checkpoint-{stop.trained}").is_dir():
            save(stop.trained)
        parallel.barrier()
        if parallel.rank() != 0:
            raise SystemExit(2) from None
        close()
        fail(
            f"{stop} Saved checkpoint-{stop.trained} in {output_dir}: {stop.hint}, rerun with "
            "--resume_from_checkpoint latest"
        )
    except torch.OutOfMemoryError:
        close()
        fail(out_of_memory(timer.phase, output_dir))
    except InputError as e:
        close()
        fail(str(e))
    except (KeyboardInterrupt, Terminated) as e:
        close()
        code, name = (130, "Ctrl-C") if isinstance(e, KeyboardInterrupt) else (143, "SIGTERM")
        if parallel.rank() != 0:
            raise SystemExit(code) from None
        fail(interrupted(name, output_dir), code=code)
    except Exception:  # a bug: its traceback, after the folder's claim is released
        close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(name, output_dir):
    found, step = checkpoints(output_dir), run_step(output_dir)
    if not step:
        return f"stopped by {name} before the first step ended: nothing was kept; the same command starts again"
    if not found:
        return (
            f"stopped by {name} after step {step}, before the first checkpoint (--checkpointing_steps); to redo it "
            f"from step 0: {resume_command()}"
        )
    return (
        f"stopped by {name} after step {step}; last checkpoint {found[-1]} (the steps after it run again). To go on: "
        f"{resume_command()}"
    )


def out_of_memory(phase, output_dir):
    found = checkpoints(output_dir)
    phase = {"train": "update", "judge_wait": "scoring", "log": "logging", "checkpoint": "checkpointing"}.get(
        phase, phase
    )
    return (
        f"CUDA out of memory during the {phase}. Lower it with --train_batch_size 1 (update), a smaller "
        "--group_size (rollout) or --rank, or serve the judge elsewhere (--judge_url); then resume with "
        f"--resume_from_checkpoint {found[-1] if found else 'latest (none saved yet: starts at step 0)'}"
    )
