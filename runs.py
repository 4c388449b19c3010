"""What a training run keeps on disk and shows: one run per --output_dir, metrics and trackers, checkpoints.

Shared by train.py, sft.py and distill.py, so each of these exists once:
- one run per folder, never written over (claim_output_dir): an exclusive OS file lock on OUT/.lock (released by
  the OS when the process dies, so a kill -9 never leaves the folder locked); a second run on a busy folder, or a
  new run on a folder that holds one, stops at once with one line and changes nothing; a finished run resumed
  says it is done (finished);
- metrics.jsonl (always, one JSON object per step) and the tracker of --report_to (tensorboard or wandb), which
  receives the same scalars and the sample pictures;
- atomic checkpoints OUT/checkpoint-<step>/ (the LoRA in diffusers and PEFT formats + training_state.pt, which
  loads with torch.load(weights_only=True)) and exact resume;
- the final LoRA at OUT/ with a model card (README.md, lora.write_model_card) that huggingface_hub reads;
- the line between bad input (one line, non-zero exit) and a bug (its traceback): `input_errors`, and every
  script's ArgumentParser, whose errors are one line too.
This module imports only torch at load (lora, rollout and reward where a function needs them), so that every
script's command line, reward.py's and rollout.py's included, can use it.

    python -c "import runs; print(runs.checkpoints(__import__('pathlib').Path('outputs/stable-layers')))"
"""

import argparse
import fcntl
import json
import os
import re
import resource
import shutil
import socket
import sys
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

import parallel

REPORT_TO = ("tensorboard", "wandb", "none")


# ----------------------------------------------------------------------------- bad input vs bugs
class InputError(Exception):
    """Bad input: a flag, a file, a server or the environment is not as it must be. One line, exit 2."""


@contextmanager
def input_errors():
    """Exceptions raised inside that come from the user's input (a missing or unreadable file or folder, a
    value that is not accepted, a server that cannot be reached, a package that is not installed) become one
    line and exit code 2. Use it around setup only: inside the training loop, every exception keeps its
    traceback, because there it is a bug (in a forked reward, a shape) and the traceback is what is needed."""
    try:
        yield
    except (InputError, ValueError, OSError, ImportError) as e:
        fail(str(e))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors: `error: <what>` and exit 2, not the usage block that buries the one
    line that matters; the usage and every flag stay on --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")


def pick_device(device=None, mixed_precision="bf16"):
    """(device, dtype) of a run: --device cpu, cuda or cuda:N (default cuda when a GPU is visible, else cpu) and the
    frozen weights' dtype, --mixed_precision on CUDA and float32 on the CPU (bf16 matmuls are slow there)."""
    import rollout

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu "
            "or install a CUDA build of torch"
        )
    if not device.startswith(("cuda", "cpu")):
        raise InputError(f"--device {device}: use cpu, cuda or cuda:N")
    return device, rollout.DTYPES[mixed_precision] if device.startswith("cuda") else torch.float32


def fail(message):
    """Stop with one line on stderr and exit code 2 (argparse's code for bad input). An output folder this process
    claimed and left holding nothing but its .lock is removed first (claim_output_dir): a failed start leaves
    nothing behind."""
    print(f"error: {message}", file=sys.stderr)
    for lock in list(_CLAIMED):
        _release_unused(lock)
    raise SystemExit(2) from None


# ----------------------------------------------------------------------------- stopping with a resumable state
class Stop(Exception):
    """The run cannot go on for now (a judge that answers nothing): the message says why; `guard` saves the state
    after step `trained` and stops every rank with one line that ends with how to go on (`hint`)."""

    def __init__(self, message, trained, hint):
        super().__init__(message)
        self.trained, self.hint = trained, hint


@contextmanager
def guard(output_dir, timer, save, close):
    """Around the training loop, its two ways to stop with one line (exit 2) and a resumable state:
    - Stop: rank 0 writes checkpoint-<trained> with save(trained) unless it exists, every rank waits for it (no rank
      may exit, and so make torchrun stop the others, before it is written), then every rank stops;
    - CUDA out of memory: the line names the phase (timer.phase), the flags that lower it and the checkpoint to
      resume from.
    close() runs first (the progress bar, the folder's lock), so the line stands alone and the folder is free."""
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


# ----------------------------------------------------------------------------- one run per folder
RUN_FILES = ["metrics.jsonl", "pytorch_lora_weights.safetensors", "peft", "README.md", "logs", "samples", "wandb"]
_CLAIMED = weakref.WeakKeyDictionary()  # lock file -> (whether .lock is new, the folders claim_output_dir made)


def claim_output_dir(output_dir, resume=None):
    """One run per folder, never written over. Make output_dir, lock output_dir/.lock for the life of the process (an
    exclusive OS lock) and return the open file: keep a reference, close it when the run ends. Stop with one line
    naming --output_dir, and change nothing there, if the folder cannot be made, another process holds the lock, or
    (without --resume_from_checkpoint, `resume`) it holds a run or what a run writes (RUN_FILES, checkpoint-*).
    Should the process stop with one line (fail) before writing anything, the folder goes again."""
    output_dir = Path(output_dir)
    there = next(d for d in (output_dir, *output_dir.parents) if d.exists())  # the folder or its nearest parent
    if not there.is_dir():
        raise InputError(f"--output_dir {output_dir}: {there} is a file, not a folder; choose another --output_dir")
    made = [d for d in (output_dir, *output_dir.parents) if not d.exists()]  # innermost first
    new_lock = not (output_dir / ".lock").exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        f = open(output_dir / ".lock", "a+")
    except OSError as e:
        raise InputError(
            f"--output_dir {output_dir}: cannot make it or write there ({e.strerror}: {e.filename}); "
            "choose another --output_dir"
        ) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        fail(
            f"--output_dir {output_dir} is in use by {holder}; wait for that run to end or choose another --output_dir"
        )
    held = None if resume or made else held_run(output_dir)
    if held:
        f.close()
        if new_lock:
            (output_dir / ".lock").unlink()
        raise InputError(held)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _CLAIMED[f] = (new_lock, made)  # for fail(); weak: a run's end frees the lock as before
    return f


def _release_unused(lock):
    new_lock, made = _CLAIMED.pop(lock)
    if lock.closed:
        return
    lock.close()
    folder = Path(lock.name).parent
    if new_lock and [p.name for p in folder.iterdir()] == [".lock"]:
        (folder / ".lock").unlink()
        for d in made:  # innermost first; a folder that is not empty stops it
            try:
                d.rmdir()
            except OSError:
                break


def run_step(output_dir):
    """The last step output_dir's run reached: its last metrics row's or its latest checkpoint's, whichever is later
    (0 if none)."""
    output_dir = Path(output_dir)
    path = output_dir / "metrics.jsonl"
    rows = [_row_step(line) for line in (path.read_text().splitlines() if path.is_file() else [])]
    return max(
        [int(p.name.split("-")[1]) for p in checkpoints(output_dir)] + [r for r in rows if r < float("inf")], default=0
    )


def held_run(output_dir):
    """Why a new run must not start in output_dir (one line: what it holds and the two ways on), or None."""
    output_dir = Path(output_dir)
    found = [n + "/" * (output_dir / n).is_dir() for n in RUN_FILES if (output_dir / n).exists()]
    saved = [p.name for p in checkpoints(output_dir)]
    final = (output_dir / "pytorch_lora_weights.safetensors").is_file()
    step = run_step(output_dir)
    if step or saved or final:
        held = saved + ["metrics.jsonl"] * ("metrics.jsonl" in found) + ["the final LoRA"] * final
        on = "To go on from its last checkpoint add" if saved else "It saved no checkpoint: to redo it from step 0 add"
        return (
            f"--output_dir {output_dir} holds a run, to step {step} ({', '.join(held)}); nothing was changed. {on} "
            "--resume_from_checkpoint latest; to start a new run choose another --output_dir"
        )
    if found:
        return (
            f"--output_dir {output_dir} holds {', '.join(found)}, which a run writes; nothing was changed. Choose "
            "another --output_dir, or add --resume_from_checkpoint latest to write there"
        )
    return None


def finished(output_dir, resume, max_train_steps):
    """True, after one line saying so, if resuming would train nothing: the checkpoint to resume from is at or past
    --max_train_steps and output_dir holds the final LoRA. Nothing is loaded or written."""
    output_dir = Path(output_dir)
    found = checkpoints(output_dir) if resume == "latest" else [Path(resume)] if resume else []
    step = re.fullmatch(r"checkpoint-(\d+)", found[-1].name) if found else None
    if not (step and int(step[1]) >= max_train_steps and (output_dir / "pytorch_lora_weights.safetensors").is_file()):
        return False
    if os.environ.get("RANK", "0") == "0":  # one line under torchrun too
        print(
            f"{output_dir} is trained to step {step[1]} (--max_train_steps {max_train_steps}) and holds its final "
            "LoRA: nothing to do. To train further, raise --max_train_steps"
        )
    return True


def written(output_dir):
    """The script's last line: what the run wrote where."""
    d, saved = Path(output_dir), checkpoints(output_dir)
    samples = sorted((d / "samples").glob("*.png"))
    items = [
        (
            "the final LoRA (pytorch_lora_weights.safetensors, peft/, model card README.md)",
            (d / "pytorch_lora_weights.safetensors").is_file(),
        ),
        (", ".join(p.name + "/" for p in saved), saved),
        (f"metrics.jsonl (to step {run_step(d)})", (d / "metrics.jsonl").is_file()),
        (f"samples/ ({len(samples)} pictures)", samples),
        ("wandb/", (d / "wandb").is_dir()),
        (f"logs/ (tensorboard --logdir {d / 'logs'})", (d / "logs").is_dir()),
    ]
    return f"wrote in {d}: " + "; ".join(text for text, present in items if present)


def device_line(device, dtype, quantize=None):
    """The start-up line's words for where and in what precision the model runs, and its --quantize if it has one."""
    import quantize as q

    line = f"device {device}, {str(dtype).removeprefix('torch.')} weights"
    return (
        line
        if quantize is None
        else line
        + (
            ", no quantization (--quantize none)"
            if quantize == "none"
            else f", blocks quantized to {quantize} ({q.QUANTIZE[quantize]})"
        )
    )


# ----------------------------------------------------------------------------- metrics and trackers
class RunLog:
    """metrics.jsonl (always) plus the --report_to tracker. log(record) writes one step's scalars to both;
    image(tag, picture, step) sends a picture to the tracker (the PNG itself is written by the caller)."""

    def __init__(self, output_dir, report_to="tensorboard", config=None, project="stable-layers"):
        self.output_dir = Path(output_dir)
        self.file = open(self.output_dir / "metrics.jsonl", "a")
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

    def image(self, tag, picture, step):
        if self.tb is not None:
            import numpy as np

            self.tb.add_image(tag, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(picture)}, step=step)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def last_metrics(output_dir):
    """The last row of output_dir/metrics.jsonl, or {}."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir):
    """output_dir's checkpoint-{step} folders, oldest first (temporary .checkpoint-*.tmp ones excluded)."""
    return sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output_dir, step, transformer, optimizer, args, limit, method="Flow-GRPO (Stable-Layers)"):
    """output_dir/checkpoint-{step}/: the LoRA in both formats + training_state.pt ({step, optimizer, args}:
    tensors and plain Python types only, so it loads with weights_only=True; no RNG state is kept because every
    random draw of a step derives from (seed, step)). Written under a temporary name and renamed, so a kill
    never leaves a broken one; older checkpoints beyond `limit` are removed."""
    import lora

    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args)}, tmp / "training_state.pt")
    lora.write_model_card(tmp, args, last_metrics(output_dir), method=method)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    found = checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path, output_dir, transformer, optimizer, writer=True):
    """Restore the LoRA and the optimizer from a checkpoint folder (or "latest" in output_dir; none: step 0)
    and, if this process is the run's writer (rank 0), drop the metric rows logged after it (those steps run
    again). Returns the step to continue from."""
    import lora

    output_dir, step = Path(output_dir), 0
    found = checkpoints(output_dir) if path == "latest" else [Path(path)]
    if found:
        path = found[-1]
        if not (path / "training_state.pt").is_file():
            raise InputError(f"--resume_from_checkpoint {path}: no training_state.pt there")
        lora.load_peft_weights(transformer, path / "peft")
        state = torch.load(path / "training_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    metrics = output_dir / "metrics.jsonl"
    if writer and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if _row_step(line) <= step]
        metrics.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(metrics.with_suffix(".tmp"), metrics)
    if writer:
        print(f"resumed from {path} at step {step}" if found else f"no checkpoint in {output_dir}: starting at step 0")
    return step


def _row_step(line):
    """A metrics.jsonl row's step; a row cut short by a kill counts as after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def save_final(output_dir, transformer, args, method="Flow-GRPO (Stable-Layers)"):
    """The final LoRA at output_dir (pytorch_lora_weights.safetensors, peft/) and its model card README.md,
    written to a temporary folder first and moved in item by item."""
    import lora

    output_dir = Path(output_dir)
    tmp = output_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    lora.write_model_card(tmp, args, last_metrics(output_dir), sample=latest_sample(output_dir), method=method)
    for item in tmp.iterdir():
        shutil.rmtree(output_dir / item.name, ignore_errors=True)
        os.replace(item, output_dir / item.name)
    tmp.rmdir()


def latest_sample(output_dir):
    found = sorted((Path(output_dir) / "samples").glob("*.png"))
    return found[-1].relative_to(output_dir).as_posix() if found else None


# ----------------------------------------------------------------------------- pictures and the GPU
def save_group_png(path, traj, rewards, advantages, candidates):
    """One scored group: the input and each candidate's layers, captioned with its reward, advantage and,
    for the VLM reward, the stage-1 total, the stage-2 score and each criterion's score. Returns the picture."""
    import reward

    captions = []
    for k, (r, a) in enumerate(zip(rewards.tolist(), advantages.tolist())):
        c = candidates[k] if k < len(candidates) else {}
        stages = [f"{n} {c[n]:.2f}" for n in ("stage1", "stage2") if isinstance(c.get(n), (int, float))]
        criteria = [f"{n[:5]} {v:.1f}" for n, v in (c.get("criteria") or {}).items()]
        captions.append("  ".join([f"r {r:.3f}  A {a:+.2f}", *stages, *criteria]))
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [chr(ord("A") + k) for k in range(len(rewards))]
    picture = reward.render_group_grid(traj.images[0], traj.layers, labels, captions=captions)
    picture.save(path)
    return picture


def check_attention(device, dtype):
    """At 640 px only flash or memory-efficient attention fits (the math path's N x N scores do not: docs/performance.md):
    check on CUDA that one of them runs, and say how to fix it if not."""
    if not str(device).startswith("cuda"):
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 24, 256, 128, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        raise InputError(
            f"no memory-efficient attention kernel on {device} ({str(e).splitlines()[0][:120]}): "
            "the math path cannot fit a 640 px step; install a CUDA build of torch >= 2.4 and use "
            "--mixed_precision bf16"
        ) from None


def out_of_memory(phase, output_dir):
    found = checkpoints(output_dir)
    phase = {"train": "update", "judge_wait": "scoring", "log": "logging and checkpointing"}.get(phase, phase)
    return (
        f"CUDA out of memory during the {phase}. Lower it with --train_batch_size 1 (update), a smaller "
        "--group_size (rollout) or --rank, or serve the judge elsewhere (--judge_url); then resume with "
        f"--resume_from_checkpoint {found[-1] if found else 'latest (none saved yet: starts at step 0)'}"
    )
