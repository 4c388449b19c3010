"""Several processes, one algorithm: torchrun's gloo ranks on the CPU train the LoRA one process trains, with the
frozen weights replicated (data parallel) or sharded (--fsdp), resume across world sizes and modes, and a killed
rank stops the job."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]  # the repository


def _torchrun(nproc, argv, timeout=240, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            str(ROOT / "train.py"),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kw,
    )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_equal_one_process_and_resume_with_any_world_size(
    image_dir, tmp_path, tiny_flags, peft_weights
):
    """gloo on CPU: 2 ranks x 1 image per step train the LoRA of 1 process x 2 images; a 2-rank run stopped at
    step 2 resumes to 4 on 1 rank, equal to 4 uninterrupted steps; only rank 0 writes. (Resuming on the same number
    of ranks is test_resume_gives_the_same_run's case: the checkpoint holds nothing rank-specific.) The one-process
    runs are in this process (one thread, as the ranks have)."""
    common = [
        "--images",
        str(image_dir),
        "--reward",
        "recon",
        "--layers",
        "2",
        "--sample_every",
        "2",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "10",
        *tiny_flags(),
        "--images_per_step",
        "2",
    ]
    train.main([*common, "--output_dir", str(tmp_path / "one"), "--max_train_steps", "4"])
    two = _torchrun(2, [*common, "--output_dir", str(tmp_path / "two"), "--max_train_steps", "2"])
    assert two.returncode == 0, two.stderr[-800:]
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    train.main(
        [
            *common,
            "--output_dir",
            str(tmp_path / "two_then_one"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    ref = {k: peft_weights(tmp_path / "one" / f"checkpoint-{s}") for k, s in (("2", 2), ("4", 4))}
    two_at_2 = peft_weights(tmp_path / "two" / "checkpoint-2")
    dw = max((ref["2"][k] - two_at_2[k]).abs().max().item() for k in ref["2"])
    print(f"world-size invariance: max |dW| after 2 steps = {dw:.2e}")
    assert dw <= 1e-6
    final = peft_weights(tmp_path / "two_then_one")
    assert max((ref["4"][k] - final[k]).abs().max().item() for k in final) <= 1e-6
    ref_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for folder, steps in (("two", 2), ("two_then_one", 4)):
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))  # one row per step: only rank 0 writes
        assert [r["reward/mean"] for r in rows] == pytest.approx(
            [r["reward/mean"] for r in ref_rows[:steps]], abs=1e-6
        )
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step-000002.png"]
    bad = _torchrun(2, [*common, "--output_dir", str(tmp_path / "odd"), "--images_per_step", "3"])
    assert bad.returncode != 0 and "multiple of the number of ranks (2)" in bad.stderr


def test_torchrun_a_killed_rank_stops_the_job(image_dir, tmp_path, tiny_flags):
    import psutil

    argv = [
        "--images",
        str(image_dir),
        "--reward",
        "recon",
        "--layers",
        "2",
        "--sample_every",
        "0",
        "--output_dir",
        str(tmp_path),
        "--max_train_steps",
        "500",
        *tiny_flags(),
        "--images_per_step",
        "2",
    ]
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(ROOT / "train.py"),
            *argv,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 180
        while not (tmp_path / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        rank1 = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        t = time.time()
        rank1[0].kill()
        err = job.communicate(timeout=90)[1]
        print(f"job stopped {time.time() - t:.1f} s after rank 1 was killed")
        assert job.returncode != 0 and "rank: 1" in err
    finally:
        if job.poll() is None:
            job.kill()


def _max_dw(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _rewards(folder):
    return [json.loads(line)["reward/mean"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_ranks_equal_one_process_and_resume_across_modes(image_dir, tmp_path, tiny_flags, peft_weights):
    """2 gloo ranks with --fsdp (each holding half of the frozen transformer) train the LoRA of one process to float
    summation order, with the same rewards; a sharded checkpoint resumes in one process without --fsdp, and an
    unsharded one under --fsdp, both ending where 4 straight steps end. Checkpoints are the same files either way."""
    common = [
        "--images",
        str(image_dir),
        "--reward",
        "recon",
        "--layers",
        "2",
        "--sample_every",
        "0",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "10",
        *tiny_flags(),
        "--images_per_step",
        "2",
        "--beta",
        "0.04",
    ]
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train.main([*common, "--output_dir", str(one), "--max_train_steps", "4"])
    run = _torchrun(2, [*common, "--output_dir", str(sharded), "--max_train_steps", "2", "--fsdp"])
    assert run.returncode == 0, run.stderr[-800:]
    shares = {
        int(r): (float(a), float(b))
        for r, a, b in re.findall(r"rank (\d): ([\d.e-]+) of the frozen transformer's ([\d.e-]+) GiB", run.stdout)
    }
    assert sorted(shares) == [0, 1] and all(a == pytest.approx(b / 2, rel=0.05) for a, b in shares.values())
    dw = _max_dw(peft_weights(one / "checkpoint-2"), peft_weights(sharded / "checkpoint-2"))
    print(f"--fsdp, 2 ranks vs 1 process: max |dW| after 2 steps = {dw:.2e}")
    assert dw <= 1e-6 and _rewards(sharded) == pytest.approx(_rewards(one)[:2], abs=1e-6)
    assert sorted(p.name for p in sharded.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # rank 0 alone writes
    assert set(torch.load(sharded / "checkpoint-2" / "training_state.pt", weights_only=True)) == set(
        torch.load(one / "checkpoint-2" / "training_state.pt", weights_only=True)
    )

    shutil.copytree(sharded, tmp_path / "sharded_then_one")  # sharded -> one process, no --fsdp
    train.main(
        [
            *common,
            "--output_dir",
            str(tmp_path / "sharded_then_one"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    unsharded = tmp_path / "one_then_sharded"  # one process -> sharded
    shutil.copytree(one, unsharded)
    for late in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(unsharded / late)
    run = _torchrun(
        2,
        [
            *common,
            "--output_dir",
            str(unsharded),
            "--max_train_steps",
            "4",
            "--fsdp",
            "--resume_from_checkpoint",
            "latest",
        ],
    )
    assert run.returncode == 0, run.stderr[-800:]
    for resumed in (tmp_path / "sharded_then_one", unsharded):
        assert _max_dw(peft_weights(one), peft_weights(resumed)) <= 1e-6
        assert _rewards(resumed) == pytest.approx(_rewards(one), abs=1e-6)


def test_fsdp_refuses_what_it_cannot_shard(image_dir, tmp_path, capsys, tiny_flags):
    """--fsdp in one process, or with a quantized base: one line at start-up, exit 2, nothing loaded."""
    for extra, message in (
        (["--fsdp"], "torchrun --nproc_per_node N"),
        (["--fsdp", "--quantize", "int8"], "--fsdp with --quantize int8"),
    ):
        with pytest.raises(SystemExit) as e:
            train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / "x"), *tiny_flags(), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0]
