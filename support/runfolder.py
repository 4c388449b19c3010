"""One run per --output_dir, never written over: claiming the folder, what makes it "a run", what a run wrote.

A folder holds a run once it holds a checkpoint (checkpoint-<step>/), a row of metrics.jsonl or the final LoRA. A new
run (no --resume_from_checkpoint) on such a folder stops at once with one line and changes nothing; a finished run
resumed says it is done (`finished`). A start that trained no step (a bad flag, a judge down, a reward that returns the
wrong thing, a crash in the first step) leaves no run: the folder goes again, or the same command may reuse it.

The claim is an exclusive OS file lock on OUT/.lock, held for the life of the process and released by the OS when the
process dies, so a kill -9 never leaves the folder locked.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from support.cli import InputError, at_fail, fail

RUN_FILES = ["metrics.jsonl", "pytorch_lora_weights.safetensors", "peft", "README.md", "logs", "samples", "wandb"]
_CLAIMED = {}  # open lock file -> (entries of the folder before the claim, the folders the claim made)


def claim_output_dir(output_dir, resume=None):
    """Make output_dir, lock output_dir/.lock for the life of the process and return the open file (keep it; close it
    when the run ends). Stops with one line naming --output_dir, changing nothing there, if the folder cannot be made,
    another process holds it, or (without --resume_from_checkpoint, `resume`) it holds a run, or what a run writes
    without a .lock (a folder of someone else's). A folder that a start of this project left without a run (its .lock
    is there) is reused: its leftovers go. Should the process stop with one line (cli.fail) before the folder holds a
    run, what it made there goes again."""
    output_dir = Path(output_dir)
    there = next(d for d in (output_dir, *output_dir.parents) if d.exists())  # the folder or its nearest parent
    if not there.is_dir():
        raise InputError(f"--output_dir {output_dir}: {there} is a file, not a folder; choose another --output_dir")
    made = [d for d in (output_dir, *output_dir.parents) if not d.exists()]  # innermost first
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in output_dir.iterdir()}
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
    held = None if resume else held_run(output_dir, ours=".lock" in before)
    if held:
        f.close()
        if ".lock" not in before:
            (output_dir / ".lock").unlink()
        raise InputError(held)
    if not resume and ".lock" in before and not holds_run(output_dir):
        for name in RUN_FILES:  # what a start that trained nothing left here
            remove(output_dir / name)
        before -= set(RUN_FILES)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _CLAIMED[f] = (before, made)
    at_fail(release_all)
    return f


def remove(path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def release_all():
    for lock in list(_CLAIMED):
        release(lock)


def release(lock):
    """Close the claim. If the folder holds no run, remove what this process made there (the folder itself if it made
    it), so that a failed start leaves nothing behind."""
    if lock not in _CLAIMED:
        return
    before, made = _CLAIMED.pop(lock)
    lock.close()
    folder = Path(lock.name).parent
    if holds_run(folder):
        return
    for p in folder.iterdir():
        if p.name not in before:
            remove(p)
    for d in made:  # innermost first; a folder that is not empty stops it
        try:
            d.rmdir()
        except OSError:
            break


def checkpoints(output_dir):
    """output_dir's checkpoint-<step> folders, oldest first (temporary .checkpoint-*.tmp ones excluded)."""
    return sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def row_step(line):
    """A metrics.jsonl row's step; a row cut short by a kill counts as after every step."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def metric_rows(output_dir):
    path = Path(output_dir) / "metrics.jsonl"
    return [line for line in (path.read_text().splitlines() if path.is_file() else []) if line.strip()]


def last_metrics(output_dir):
    """The last row of output_dir/metrics.jsonl, or {}."""
    rows = metric_rows(output_dir)
    return json.loads(rows[-1]) if rows else {}


def run_step(output_dir):
    """The last step output_dir's run reached: its last metrics row's or its latest checkpoint's, whichever is later
    (0 if none)."""
    steps = [row_step(line) for line in metric_rows(output_dir)]
    saved = [int(p.name.split("-")[1]) for p in checkpoints(output_dir)]
    return max(saved + [s for s in steps if s < float("inf")], default=0)


def holds_run(output_dir):
    """A checkpoint, a metrics row or the final LoRA: what makes a folder a run."""
    d = Path(output_dir)
    return bool(checkpoints(d) or metric_rows(d) or (d / "pytorch_lora_weights.safetensors").is_file())


def held_run(output_dir, ours=True):
    """Why a new run must not start in output_dir (one line: what it holds and the two ways on), or None. `ours`: the
    folder has a .lock, so files a run writes without a run are a failed start's leftovers, not someone else's."""
    output_dir = Path(output_dir)
    found = [n + "/" * (output_dir / n).is_dir() for n in RUN_FILES if (output_dir / n).exists()]
    if holds_run(output_dir):
        saved = [p.name for p in checkpoints(output_dir)]
        final = (output_dir / "pytorch_lora_weights.safetensors").is_file()
        held = saved + ["metrics.jsonl"] * bool(metric_rows(output_dir)) + ["the final LoRA"] * final
        on = "To go on from its last checkpoint add" if saved else "It saved no checkpoint: to redo it from step 0 add"
        return (
            f"--output_dir {output_dir} holds a run, to step {run_step(output_dir)} ({', '.join(held)}); nothing was "
            f"changed. {on} --resume_from_checkpoint latest; to start a new run choose another --output_dir"
        )
    if found and not ours:
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


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


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
        (f"samples/ ({plural(len(samples), 'picture')})", samples),
        ("wandb/", (d / "wandb").is_dir()),
        (f"logs/ (tensorboard --logdir {d / 'logs'})", (d / "logs").is_dir()),
    ]
    return f"wrote in {d}: " + "; ".join(text for text, present in items if present)


def resume_command(argv=None):
    """The command that goes on from the last checkpoint: this one (under torchrun, with its process count), with
    --resume_from_checkpoint latest."""
    argv = list(sys.argv if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(world)]
    rest, skip = [], False
    for token in argv[1:]:
        if skip:
            skip = False
        elif token == "--resume_from_checkpoint":
            skip = True
        elif not token.startswith("--resume_from_checkpoint="):
            rest.append(token if token and " " not in token else repr(token))
    return " ".join([*launch, argv[0], *rest, "--resume_from_checkpoint", "latest"])
