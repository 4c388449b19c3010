"""The quantized base (quantize.py) and the memory plan (memory.py), on the CPU: a GRPO and a supervised step on the
tiny model with its blocks in int8 or nf4, the LoRA they train loading on the full-precision base, the plan against
the simulation, and the one-line refusal of a quantization the machine cannot run."""

import json
import sys

import pytest
import torch
from PIL import Image

import distill
import lora
import rollout
import sft
import train
from bench import memory as memory_bench
from support import memory, quantize
from support.checkpoints import load_lora


@pytest.fixture(scope="module")
def tiny_run(tiny_flags):
    """This file's runs: conftest's tiny flags with 2 layers, micro-batches of 2, no pictures, the dtype's default."""
    return tiny_flags(layers=2, train_batch_size=2, sample_every=0, mixed_precision=None)


def velocity(transformer, traj):
    with torch.no_grad():
        return rollout.predict_velocity(transformer, traj, traj.latents[:, 1], traj.timesteps[1])


@pytest.mark.parametrize("kind, error", [("int8", 0.01), ("nf4", 0.1)])
def test_quantized_base_trains_and_its_lora_loads_on_the_full_precision_base(
    design_images, tmp_path, kind, error, capsys, tiny_run
):
    """--quantize: one GRPO step (with the KL) on the tiny model with its blocks quantized: ratio 1, the LoRA moves
    the policy. Saved, the LoRA loads on the unquantized base in diffusers and through lora.load_lora and gives the
    trained policy's velocity up to the quantization's own error, the base's velocity error, measured on the same
    inputs (int8 0.2 %, nf4 4.8 % relative L2 here; bounds 1 % and 10 %). A supervised step trains on it too, and a
    distillation pulls a fresh student towards that LoRA on it. The start-up lines say the quantization."""
    pytest.importorskip(quantize.PACKAGE[kind][0], reason="requirements.txt installs it; a GPU image may lack it")
    out = tmp_path / "grpo"
    pipe = train.main(
        [
            "--images",
            str(design_images),
            "--output_dir",
            str(out),
            "--reward",
            "recon",
            "--quantize",
            kind,
            "--max_train_steps",
            "1",
            "--learning_rate",
            "3e-2",
            *tiny_run,
        ]
    )
    assert (
        f"device cpu, float32 weights, blocks quantized to {kind} ({quantize.QUANTIZE[kind]})"
        in capsys.readouterr().out
    )
    record = json.loads((out / "metrics.jsonl").read_text())
    assert abs(record["diag/ratio_mean"] - 1) < 1e-6 and record["train/skipped_updates"] == 0
    import torch._inductor.config as inductor  # int8's config must not switch on slow autotuning process-wide

    assert not inductor.coordinate_descent_tuning
    block = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer
    assert "Int8" in type(block.weight).__name__ if kind == "int8" else type(block).__name__ == "Linear4bit"
    probe = rollout.sample(
        pipe,
        [Image.new("RGB", (64, 48), "teal")],
        layers=2,
        group_size=2,
        num_inference_steps=3,
        resolution=64,
        sde_window=(0, 2),
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    trained = velocity(pipe.transformer, probe)
    with (
        lora.lora_precision(pipe.transformer),
        pipe.transformer.disable_adapter()
        if hasattr(pipe.transformer, "disable_adapter")
        else lora.reference_policy(pipe.transformer),
    ):
        quantized_base = velocity(pipe.transformer, probe)
    full_base = velocity(rollout.load_pipeline("tiny").transformer, probe)
    base_error = ((quantized_base - full_base).norm() / full_base.norm()).item()
    assert base_error < error and (trained - quantized_base).abs().max() > 1e-4  # the LoRA matters
    via_diffusers, via_lora = rollout.load_pipeline("tiny"), rollout.load_pipeline("tiny")
    via_diffusers.load_lora_weights(str(out))
    load_lora(via_lora, out / "peft")
    for full in (via_diffusers, via_lora):
        assert ((velocity(full.transformer, probe) - trained).norm() / trained.norm()).item() < error
    sft.main(
        [
            "--device",
            "cpu",
            "--pretrained_model_name_or_path",
            "tiny",
            "--synthetic",
            "4",
            "--resolution",
            "32",
            "--layers",
            "2",
            "--max_train_steps",
            "2",
            "--validation_synthetic",
            "1",
            "--rank",
            "4",
            "--lora_alpha",
            "4",
            "--learning_rate",
            "1e-2",
            "--dataloader_num_workers",
            "0",
            "--report_to",
            "none",
            "--quantize",
            kind,
            "--output_dir",
            str(tmp_path / "sft"),
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["train/skipped_updates"] == 0 for r in rows[1:])
    assert rows[-1]["train/grad_norm"] > 0
    # distill.py on the quantized base: the GRPO LoRA above as the teacher, a fresh student pulled towards it
    distill.main(
        [
            "--images",
            str(design_images),
            "--output_dir",
            str(tmp_path / "distill"),
            "--teacher",
            f"t={out}",
            "--quantize",
            kind,
            "--max_train_steps",
            "3",
            "--learning_rate",
            "3e-2",
            "--sde_window",
            "0",
            *tiny_run,
        ]
    )
    assert f"blocks quantized to {kind}" in capsys.readouterr().out
    kl = [json.loads(line)["kl/t"] for line in (tmp_path / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert kl[0] > 0 and kl[-1] < kl[0]


def test_an_unavailable_quantization_is_refused_in_one_line(design_images, tmp_path, monkeypatch, capsys, tiny_run):
    """A backend that is not installed (bitsandbytes made unimportable, as Python does for a None entry in
    sys.modules): one line naming what to install and the quantization that would work, exit 2, before any model is
    loaded."""
    pytest.importorskip("torchao", reason="the line names the installed alternative")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SystemExit) as e:
        train.main(
            [
                "--images",
                str(design_images),
                "--output_dir",
                str(tmp_path),
                "--reward",
                "recon",
                "--quantize",
                "nf4",
                *tiny_run,
            ]
        )
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in err and "LoRA parameters" not in out
    assert err.strip().splitlines() == [
        "error: --quantize nf4 needs bitsandbytes: pip install bitsandbytes (or "
        "--quantize int8, whose backend is installed)"
    ]


@pytest.mark.parametrize(
    "setup",
    [
        memory.Setup(num_blocks=2, group_size=4, train_batch_size=1, resolution=512, layers=3, rank=16),
        memory.Setup(num_blocks=2, quantize="nf4", decode_chunk=3, group_size=3, train_batch_size=3, resolution=384),
    ],
    ids=["bf16", "nf4"],
)
def test_memory_plan_matches_the_simulation(setup):
    """support/memory.plan (arithmetic) against bench/memory.simulate (this code on meta tensors, the quantized weights
    counted on a real quantized block) on configurations its constants were not read from: every phase within 6 %."""
    if setup.quantize != "none":
        pytest.importorskip(quantize.PACKAGE[setup.quantize][0], reason="requirements.txt installs it")
    simulated, planned = memory_bench.simulate(setup), memory.plan(setup)
    print({k: f"plan {planned[k]:.3f} / simulated {v:.3f} GiB" for k, v in simulated.items()})
    assert all(planned[k] == pytest.approx(v, rel=0.06) for k, v in simulated.items())


def test_card_classes_fit_their_budget_by_the_plan():
    """The README's flag sets: each card class's reserved peak (plan, judge elsewhere) within its budget, and the
    smaller cards' flags needed (the defaults do not fit 48 or 24 GB)."""
    defaults = memory.plan(memory.Setup())["reserved"]
    for budget, flags in memory.CARDS.values():
        assert memory.plan(memory.Setup(**flags))["reserved"] <= budget
        assert flags or defaults <= budget
    assert all(defaults > budget for budget, flags in memory.CARDS.values() if flags)
