"""bench on the CPU: the toy table, the full-size loop reduced to one block, the FLOP formula against torch's count."""

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import lora
from bench.common import transformer_flops
from support import tiny


# ----------------------------------------------------------------------------- bench
def test_bench_cpu_toy_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    res = bench.main(
        [
            "--device",
            "cpu",
            "--size",
            "toy",
            "--resolution",
            "32",
            "--layers",
            "1",
            "--group_size",
            "2",
            "--train_batch_size",
            "1",
            "--num_inference_steps",
            "3",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--json",
            str(path),
        ]
    )
    rows = res["rows"]
    assert list(rows) == ["rollout_ours", "rollout_diffusers", "decode", "train_no_kl", "train_kl", "rollout_lora"]
    for key, row in rows.items():
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, key
        assert row["alloc_gib"] is None and row["measured"]["seconds"] == row["seconds"]  # CPU; 2 of 2 blocks
        if key != "decode":
            assert row["flop"] > 0 and math.isfinite(row["tflops"]) and row["tflops"] > 0, key
    assert res["tokens"] == {"noise": 2 * 2 * 2, "condition": 2 * 2, "text": 11}
    # the KL row adds the reference forward, the LoRA row adds the adapters' matmuls
    assert rows["train_kl"]["flop"] > rows["train_no_kl"]["flop"] > rows["rollout_ours"]["flop"] / 2
    assert rows["rollout_lora"]["flop"] > rows["rollout_ours"]["flop"] == rows["rollout_diffusers"]["flop"]
    ratios = res["ratios"]
    assert ratios["rollout ours / diffusers"] == pytest.approx(
        rows["rollout_ours"]["seconds"] / rows["rollout_diffusers"]["seconds"]
    )
    assert ratios["train with KL / without KL"] == pytest.approx(
        rows["train_kl"]["seconds"] / rows["train_no_kl"]["seconds"]
    )
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert res["train_step_estimate"]["seconds"] > rows["decode"]["seconds"]
    printed = capsys.readouterr().out
    assert "ratio rollout ours / diffusers" in printed and "train micro-step, beta 0.04" in printed
    assert json.loads(path.read_text())["rows"]["train_kl"]["flop"] == rows["train_kl"]["flop"]
    with pytest.raises(SystemExit):  # a micro-batch larger than the group is refused
        bench.parse_args(["--device", "cpu", "--group_size", "2", "--train_batch_size", "3"])


def test_full_size_loop_reduced_to_one_block_on_cpu(capsys):
    """bench.py --loop, the GPU's full-size check, on the CPU: the released width (one of the 60 blocks, 32 px): two
    steps of train.py with a resume between them, ratio 1, and checkpoints holding exactly the LoRA twice (diffusers
    and PEFT files) and AdamW's two moments: 4 x 4 bytes x 22 r D (the last block's 8 adapted linears: 6 of D -> D,
    2 of D <-> 4D)."""
    res = bench.main(
        [
            "--loop",
            "--device",
            "cpu",
            "--num_blocks",
            "1",
            "--resolution",
            "32",
            "--layers",
            "1",
            "--group_size",
            "2",
            "--train_batch_size",
            "2",
            "--num_inference_steps",
            "3",
            "--sde_window",
            "1",
            "--beta",
            "0",
            "--rank",
            "4",
            "--lora_alpha",
            "8",
        ]
    )
    assert (
        res["model"] == "random:1"
        and res["steps"] == [1, 2]
        and res["step1 time/checkpoint_s"] > 0
        and res["step2 time/checkpoint_s"] > 0
    )
    assert all(abs(res[f"step{s} diag/ratio_mean"] - 1) < 1e-5 for s in (1, 2))
    assert res["checkpoint_mib"] * 2**20 == pytest.approx(16 * 22 * 4 * 3072, rel=0.01)
    assert "resumed from" in capsys.readouterr().out


def test_bench_flop_formula_matches_torch_count():
    """The docstring's FLOP formula equals torch.utils.flop_counter's count (math attention backend, so attention
    is counted as matmuls) on the tiny model: forward with and without LoRA, and a training micro-step (forward,
    checkpoint recompute, backward)."""
    torch.manual_seed(0)
    transformer = tiny.tiny_pipeline().transformer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: threads only add OpenMP spin-waits on a busy CI machine
    cfg, batch, layers, h, n_txt, rank = transformer.config, 2, 2, 4, 5, 4
    n_noise = (layers + 1) * h * h
    kwargs = dict(
        hidden_states=torch.randn(batch, n_noise + h * h, cfg.in_channels),
        timestep=torch.full((batch,), 0.5),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg.joint_attention_dim),
        img_shapes=[[(1, h, h)] * (layers + 1) + [(1, h, h)]] * batch,
        additional_t_cond=torch.zeros(batch, dtype=torch.long),
        return_dict=False,
    )

    def count(grad=False):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = transformer(**kwargs)[0]
            if grad:
                out.square().mean().backward()
        return counter.get_total_flops()

    def formula(r):
        return transformer_flops(cfg, n_noise + h * h, n_txt, cfg.num_layers, r)

    try:
        plain = count()
        lora.add_lora(transformer, rank, 2 * rank)
        with_lora = count()
        transformer.enable_gradient_checkpointing()
        transformer.train()
        training = count(grad=True)
    finally:
        torch.set_num_threads(threads)
    assert plain == batch * formula(0)["forward"]
    assert with_lora == batch * formula(rank)["forward"]
    assert training == batch * formula(rank)["train"]
