"""Several processes, one algorithm: torchrun's gloo ranks on the CPU train the LoRA one process trains, with the
frozen weights replicated (data parallel) or sharded (--fsdp), and resume across world sizes and modes."""

import json
import re
import shutil

import pytest
import torch

import train
from test_smoke import TINY, _lora, _torchrun, image_dir  # noqa: F401 (image_dir: a fixture)


def _max_dw(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _rewards(folder):
    return [json.loads(line)["reward/mean"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fsdp_two_ranks_equal_one_process_and_resume_across_modes(image_dir, tmp_path):  # noqa: F811
    """2 gloo ranks with --fsdp (each holding half of the frozen transformer) train the LoRA of one process to float
    summation order, with the same rewards; a sharded checkpoint resumes in one process without --fsdp, and an
    unsharded one under --fsdp, both ending where 4 straight steps end. Checkpoints are the same files either way."""
    common = ["--images", str(image_dir), "--reward", "recon", "--layers", "2", "--sample_every", "0",
              "--checkpointing_steps", "1", "--checkpoints_total_limit", "10", *TINY, "--images_per_step", "2",
              "--beta", "0.04"]
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train.main([*common, "--output_dir", str(one), "--max_train_steps", "4"])
    run = _torchrun(2, [*common, "--output_dir", str(sharded), "--max_train_steps", "2", "--fsdp"])
    assert run.returncode == 0, run.stderr[-800:]
    shares = {int(r): (float(a), float(b)) for r, a, b in
              re.findall(r"rank (\d): ([\d.e-]+) of the frozen transformer's ([\d.e-]+) GiB", run.stdout)}
    assert sorted(shares) == [0, 1] and all(a == pytest.approx(b / 2, rel=0.05) for a, b in shares.values())
    dw = _max_dw(_lora(one / "checkpoint-2"), _lora(sharded / "checkpoint-2"))
    print(f"--fsdp, 2 ranks vs 1 process: max |dW| after 2 steps = {dw:.2e}")
    assert dw <= 1e-6 and _rewards(sharded) == pytest.approx(_rewards(one)[:2], abs=1e-6)
    assert sorted(p.name for p in sharded.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-1", "checkpoint-2"]  # rank 0 alone writes
    assert set(torch.load(sharded / "checkpoint-2" / "training_state.pt", weights_only=True)) == \
        set(torch.load(one / "checkpoint-2" / "training_state.pt", weights_only=True))

    shutil.copytree(sharded, tmp_path / "sharded_then_one")  # sharded -> one process, no --fsdp
    train.main([*common, "--output_dir", str(tmp_path / "sharded_then_one"), "--max_train_steps", "4",
                "--resume_from_checkpoint", "latest"])
    unsharded = tmp_path / "one_then_sharded"  # one process -> sharded
    shutil.copytree(one, unsharded)
    for late in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(unsharded / late)
    run = _torchrun(2, [*common, "--output_dir", str(unsharded), "--max_train_steps", "4", "--fsdp",
                        "--resume_from_checkpoint", "latest"])
    assert run.returncode == 0, run.stderr[-800:]
    for resumed in (tmp_path / "sharded_then_one", unsharded):
        assert _max_dw(_lora(one), _lora(resumed)) <= 1e-6
        assert _rewards(resumed) == pytest.approx(_rewards(one), abs=1e-6)


def test_fsdp_refuses_what_it_cannot_shard(image_dir, tmp_path, capsys):  # noqa: F811
    """--fsdp in one process, or with a quantized base: one line at start-up, exit 2, nothing loaded."""
    for extra, message in ((["--fsdp"], "torchrun --nproc_per_node N"),
                           (["--fsdp", "--quantize", "int8"], "--fsdp with --quantize int8")):
        with pytest.raises(SystemExit) as e:
            train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / "x"), *TINY, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0]
