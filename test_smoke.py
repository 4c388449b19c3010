"""Smoke tests: CPU, offline, tiny randomly initialised real models. Run: python -m pytest -q test_smoke.py"""

from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import base64
import csv
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
import numpy as np
import pytest
import torch

import bench
import data
import evaluate as ev
import grpo
import judges
import lora
import reward
import rollout
import runs
import tiny
import train

torch.set_num_threads(1)  # toy-sized ops: a second thread only adds OpenMP spin-waits (bench.py, --threads)


@pytest.fixture(scope="module")
def pipe():
    return rollout.load_pipeline("tiny")


def design(size=(48, 32), seed=0):
    """A small non-square 'layered design': background, a rectangle, an ellipse, a line of text."""
    g = torch.Generator().manual_seed(seed)
    c = [tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g)) for _ in range(3)]
    im = Image.new("RGB", size, c[0])
    d = ImageDraw.Draw(im)
    d.rectangle([4, 4, size[0] // 2, size[1] // 2], fill=c[1])
    d.ellipse([size[0] // 2, size[1] // 3, size[0] - 3, size[1] - 3], fill=c[2])
    d.text((2, size[1] - 12), "Hi", fill=(255, 255, 255))
    return im


# ----------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("layers,cfg", [(2, 1.0), (3, 4.0)])
def test_sampler_matches_diffusers_call(pipe, layers, cfg):
    """noise_level=0 is diffusers' own Euler loop: same layers as __call__ (640 px bucket, non-square, diffusers'
    area sizing; with CFG, its per-token norm rescale)."""
    image = design()
    ref = pipe(image.convert("RGBA"), rollout.DEFAULT_PROMPT, negative_prompt=" " if cfg > 1 else None,
               true_cfg_scale=cfg, cfg_normalize=cfg > 1, layers=layers, num_inference_steps=2, resolution=640,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images[0]  # (layers, 4, H, W)
    traj = rollout.sample(pipe, [image], layers=layers, num_inference_steps=2, noise_level=0.0, resolution=640,
                          true_cfg_scale=cfg, cfg_normalize=cfg > 1, generator=torch.Generator().manual_seed(0),
                          sizing="area")
    assert ref.shape == (layers, 4, 512, 768) and traj.layers.shape == (1, layers, 4, 512, 768)
    assert (traj.layers[0] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.3]))])
def test_log_prob_is_gaussian_mean_over_dims(sigma, sigma_next):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 12, 64, generator=g), torch.randn(2, 12, 64, generator=g)
    prev, log_prob, mean, std = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    dt = torch.as_tensor(sigma_next) - torch.as_tensor(sigma)
    scale = std * torch.sqrt(-dt).reshape(-1, 1, 1)
    expected = torch.distributions.Normal(mean, scale).log_prob(prev).mean(dim=(1, 2))
    assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-5)
    # the sigma == 1 guard uses sigma_next in the denominator: std = a sqrt(1 / (1 - 0.9)) at the first step
    if not torch.is_tensor(sigma) and sigma == 1.0:
        assert std.flatten()[0].item() == pytest.approx(0.7 * math.sqrt(1 / 0.1), rel=1e-6)
    # re-scoring the stored sample gives the same log-prob; noise 0 is exactly Euler
    _, again, _, _ = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=prev)
    assert torch.equal(again, log_prob)
    euler, lp0, _, _ = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.0)
    assert torch.equal(euler, x + dt.reshape(-1, 1, 1) * v) and torch.equal(lp0, torch.zeros(2))


def test_cps_variant():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 8, 64, generator=g), torch.randn(3, 8, 64, generator=g)
    euler, _, _, _ = rollout.sde_step_with_logprob(v, x, 0.8, 0.6, 0.0, sde_type="cps")
    torch.testing.assert_close(euler, x - 0.2 * v, rtol=0, atol=1e-6)
    prev, lp, mean, s = rollout.sde_step_with_logprob(v, x, 0.8, 0.6, 0.5, generator=g, sde_type="cps")
    assert s.flatten()[0].item() == pytest.approx(0.6 * math.sin(0.25 * math.pi))
    torch.testing.assert_close(lp, -((prev - mean) ** 2).mean(dim=(1, 2)))


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_on_policy_ratio_is_one(pipe, cfg):
    """Two groups of two; re-scoring every stored transition with the unchanged policy gives ratio 1."""
    images = [design(seed=0), design(seed=1)]
    traj = rollout.sample(pipe, images, layers=2, group_size=2, num_inference_steps=4, noise_level=1.2,
                          resolution=64, sde_window=(1, 3), true_cfg_scale=cfg,
                          generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape[:2] == (4, 3) and traj.log_probs.shape == (4, 2)
    for j in range(2):
        for rows in (slice(None), slice(1, 3)):
            log_prob, _, _ = rollout.step_log_prob(pipe.transformer, traj, j, rows)
            ratio = torch.exp(log_prob - traj.log_probs[rows, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_layers_shape_range_dtype(pipe, layers):
    traj = rollout.sample(pipe, [design(seed=layers)], layers=layers, group_size=2, num_inference_steps=3,
                          noise_level=1.0, resolution=96, generator=torch.Generator().manual_seed(0))
    x = traj.layers
    assert x.shape == (2, layers, 4, 64, 96) and x.dtype == torch.float32  # 48x32 -> longest side 96, sides % 16
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert (x[0] - x[1]).abs().max().item() > 1e-3, "group members must get independent noise"
    again = rollout.sample(pipe, [design(seed=layers)], layers=layers, group_size=2, num_inference_steps=3,
                           noise_level=1.0, resolution=96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again.layers), "same seed, same rollout"


def test_window_outside_is_ode(pipe):
    """With the window on the first step only, the later steps are deterministic given that step's sample."""
    kw = dict(layers=2, num_inference_steps=4, noise_level=1.0, resolution=64, sde_window=(0, 1))
    a = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(5), **kw)
    b = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(6), **kw)
    assert a.latents.shape[1] == 2 and a.log_probs.shape == (1, 1)
    assert not torch.equal(a.layers, b.layers)


def test_heun_beats_euler_at_equal_steps(pipe):
    """Heun (the released evaluation sampler) is closer than Euler to a 48-step Euler reference."""
    kw = dict(layers=2, resolution=64)
    ref = rollout.decompose(pipe, [design()], sampler="euler", num_inference_steps=48,
                            generator=torch.Generator().manual_seed(0), **kw)
    heun = rollout.decompose(pipe, [design()], sampler="heun", num_inference_steps=4,
                             generator=torch.Generator().manual_seed(0), **kw)
    euler = rollout.decompose(pipe, [design()], sampler="euler", num_inference_steps=4,
                              generator=torch.Generator().manual_seed(0), **kw)
    assert (heun - ref).abs().mean() < 0.5 * (euler - ref).abs().mean()


def test_rollout_bad_input(pipe, tmp_path):
    (tmp_path / "notes.png").write_text("this is not a png")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        data.open_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="empty list"):
        rollout.sample(pipe, [], layers=2, resolution=64)
    with pytest.raises(ValueError, match="no readable image"):
        data.find_images(tmp_path)
    with pytest.raises(ValueError, match="different sizes"):
        rollout.sample(pipe, [design((48, 32)), design((32, 48))], layers=2, resolution=96)
    with pytest.raises(ValueError, match="never an SDE step"):
        rollout.sample(pipe, [design()], layers=2, resolution=64, num_inference_steps=3, sde_window=(1, 3))


@pytest.mark.parametrize("aspect, longest, area", [
    ((1, 1), (640, 640), (640, 640)), ((4, 3), (640, 480), (736, 544)), ((16, 9), (640, 352), (864, 480)),
    ((3, 4), (480, 640), (544, 736)), ((9, 16), (352, 640), (480, 864)), ((3, 2), (640, 426 // 16 * 16), None),
    ((21, 9), (640, 272), None)])
def test_condition_sizing_released_rule_and_area_rule(aspect, longest, area):
    """The released inference scales the longest side to --resolution (multiples of 16, rounded down); diffusers'
    area rule (kept as --sizing area, used by the parity test) gives other sizes for every non-square input."""
    image = Image.new("RGB", (aspect[0] * 120, aspect[1] * 120))
    assert rollout.condition_size(image, 640) == longest
    if area:
        assert rollout.condition_size(image, 640, sizing="area") == area
    assert (rollout.condition_size(image, 640, "area") != longest) == (aspect != (1, 1))


def test_any_image_mode(tmp_path):
    """Grey 16-bit, palette with transparency, CMYK, EXIF-rotated: all become RGB with the right content."""
    import numpy as np

    Image.fromarray(np.full((8, 10), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    pal = Image.new("P", (10, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rot = Image.new("RGB", (10, 8), (0, 0, 255))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rot.save(tmp_path / "rotated.jpg", exif=exif)
    paths = data.find_images(tmp_path)
    images = [data.open_image(p) for p in paths]
    got = {p.stem: im for p, im in zip(paths, images)}
    assert all(im.mode == "RGB" for im in images)
    assert got["grey16"].getpixel((0, 0)) == (255, 255, 255)
    assert got["palette"].getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert got["cmyk"].getpixel((0, 0))[0] > 200 and got["cmyk"].getpixel((0, 0))[1] < 60
    assert got["rotated"].size == (8, 10)


def test_rollout_cli_writes_png_layout(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    design(seed=1).save(src / "a.png")
    design((40, 40), seed=2).save(src / "b.jpg")
    out = tmp_path / "out"
    rollout.main(["--images", str(src), "--pretrained_model_name_or_path", "tiny", "--device", "cpu",
                  "--resolution", "64",
                  "--group_size", "2", "--layers", "3", "--num_inference_steps", "2", "--output_dir", str(out)])
    layers = sorted(out.glob("*/candidate_*/layer_*.png"))
    assert len(layers) == 2 * 2 * 3
    assert Image.open(out / "a" / "candidate_01" / "layer_2.png").mode == "RGBA"
    assert Image.open(out / "b" / "image.png").size == Image.open(out / "b" / "candidate_00" / "layer_0.png").size


# ----------------------------------------------------------------------------- grpo
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0])
    a = grpo.group_advantages(r, 2)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]) / (1 + 1e-4))
    g = grpo.group_advantages(r, 3, global_std=True)
    std = r.std(unbiased=False)
    torch.testing.assert_close(g, torch.tensor([-2.0, 0.0, 2.0, 2.6667, -2.3333, -0.3333]) / (std + 1e-4), atol=1e-4,
                               rtol=0)
    assert torch.equal(grpo.group_advantages(torch.full((4,), 7.0), 4), torch.zeros(4))
    assert grpo.group_advantages(torch.tensor([0.0, 1000.0]), 2, eps=0, adv_clip_max=0.5).abs().max() == 0.5
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(torch.ones(5), 2)


def test_policy_loss_clip_and_ratio_one():
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.tensor([-1.0, -2.0, -3.0])
    new = old.clone().requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item()) and float(stats["diag/ratio_mean"]) == 1.0
    loss.backward()
    torch.testing.assert_close(new.grad, -adv / 3)  # d/dlogp of -A*ratio/B at ratio 1
    # ratio 1.5 with A > 0 (clip binds above) and ratio 0.5 with A < 0 (binds below): zero gradient
    new = (old + torch.log(torch.tensor([1.5, 0.5, 1.0]))).requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    loss.backward()
    assert new.grad[:2].abs().max() == 0 and new.grad[2] != 0
    assert float(stats["diag/clipfrac"]) == pytest.approx(2 / 3)
    assert float(stats["diag/approx_kl"]) == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_kl_loss():
    m = torch.randn(2, 5, 4)
    assert grpo.kl_loss(m, m.clone(), torch.full((2, 1, 1), 0.3)).item() == 0.0
    kl = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5))
    assert kl.item() == pytest.approx(1 / (2 * 0.25))
    exact = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5), dt=-0.1)
    assert exact.item() == pytest.approx(1 / (2 * 0.25 * 0.1))


# ----------------------------------------------------------------------------- train
TINY = ["--pretrained_model_name_or_path", "tiny", "--resolution", "64", "--group_size", "4", "--num_inference_steps",
        "4", "--rank", "4", "--lora_alpha", "8", "--mixed_precision", "no", "--train_batch_size", "4",
        "--images_per_step", "1", "--report_to", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Designs in awkward formats, one corrupt PNG and a text file."""
    d = tmp_path_factory.mktemp("images")
    design((48, 32), seed=0).save(d / "a.png")
    design((40, 40), seed=1).convert("CMYK").save(d / "b.jpg")
    design((48, 32), seed=2).convert("P").save(d / "c.gif")
    Image.fromarray((np.asarray(design((32, 48), seed=3).convert("L"), np.uint16) * 257)).save(d / "d16.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "README.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def run(image_dir, tmp_path_factory):
    out, err = tmp_path_factory.mktemp("run"), io.StringIO()
    with redirect_stderr(err):  # the corrupt PNG is skipped with one plain line
        pipe = train.main(["--images", str(image_dir), "--output_dir", str(out), "--reward", "recon", "--layers", "2", "3",
                           "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                           "--sample_every", "1", *TINY, "--images_per_step", "2"])
    skipped = [line for line in err.getvalue().splitlines() if "broken.png" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping {image_dir / 'broken.png'}: not a readable image (")
    return out, pipe


def test_train_outputs_and_first_ratio(run):
    out, pipe = run
    assert pipe.text_encoder is None and rollout.DEFAULT_PROMPT in pipe._prompt_cache  # encoded once, then freed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ["reward/mean", "reward/std", "recon/l1", "loss/policy", "loss/kl", "diag/clipfrac", "diag/approx_kl",
                "diag/ratio_mean", "time/rollout_s", "time/reward_s", "time/train_s", "mem/peak_gb"]:
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(abs(r["diag/ratio_mean"] - 1) < 1e-5 for r in records)  # one inner epoch: fully on-policy
    assert records[0]["reward/mean"] == pytest.approx(-records[0]["recon/l1"])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # pruned to the limit
    assert not list(out.glob(".*tmp"))
    assert Image.open(out / "samples" / "step-000002.png").size[0] > 64


def tiny_policy(rank, train_batch_size, sde_window):
    """A fresh tiny pipeline with a LoRA, train.py's args, and one group of 4 rollouts (T = 4, a = 1.2)."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny")
    params = lora.add_lora(pipe.transformer, rank, 2 * rank)
    args = train.parse_args(["--images", ".", "--reward", "recon", "--beta", "0",
                             "--train_batch_size", str(train_batch_size)])
    traj = rollout.sample(pipe, [design()], layers=2, group_size=4, num_inference_steps=4, noise_level=1.2,
                          resolution=64, sde_window=sde_window, generator=torch.Generator().manual_seed(0))
    return pipe, params, args, traj


def test_update_follows_advantages():
    """After one update, the log-prob of each stored transition moves with its advantage."""
    pipe, params, args, traj = tiny_policy(8, 4, (0, 2))
    advantages = torch.tensor([1.5, -0.5, 0.5, -1.5])
    stats = train.policy_update(pipe.transformer, [traj], advantages, args, params, torch.optim.AdamW(params, lr=1e-2))
    assert stats["diag/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["train/skipped_updates"] == 0
    with torch.no_grad():
        new = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
    delta = (new - traj.log_probs).sum(1)
    assert torch.corrcoef(torch.stack([delta, advantages]))[0, 1] > 0.9


def test_non_finite_loss_skips_the_update():
    pipe, params, args, traj = tiny_policy(4, 2, (0, 1))
    before = [p.detach().clone() for p in params]
    stats = train.policy_update(pipe.transformer, [traj], torch.tensor([1.0, float("nan"), -1.0, 0.0]), args, params,
                                torch.optim.AdamW(params, lr=1e-2))
    assert stats["train/skipped_updates"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and all(p.grad is None for p in params)


def test_bf16_model_with_fp32_lora():
    """On a bf16 model, lora_precision runs the fp32 LoRA in bf16 under autocast: the same policy as peft's
    fp32 path up to bf16 rounding, ratio 1 on re-scoring, and fp32 gradients on every LoRA weight."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny", torch_dtype=torch.bfloat16)
    params = lora.add_lora(pipe.transformer, 4, 8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)  # lora_B starts at 0: make the adapter matter
    kw = dict(layers=2, group_size=2, num_inference_steps=3, noise_level=1.0, resolution=64, sde_window=(0, 2))
    with lora.lora_precision(pipe.transformer):
        traj = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(0), **kw)
        log_prob, _, _ = rollout.step_log_prob(pipe.transformer, traj, 1)
        (-log_prob.mean()).backward()
        v_autocast = rollout.predict_velocity(pipe.transformer, traj, traj.latents[:, 0], traj.timesteps[0]).float()
    torch.testing.assert_close(log_prob.detach(), traj.log_probs[:, 1], rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():  # peft's default: inputs upcast to the fp32 LoRA weights
        v_peft = rollout.predict_velocity(pipe.transformer, traj, traj.latents[:, 0], traj.timesteps[0]).float()
    assert (v_autocast - v_peft).abs().max() < 0.05 * v_peft.abs().max()


def bf16_policy(blocks=None):
    """The tiny pipeline in bf16 with an active fp32 LoRA (B drawn N(0, 0.3): the adapter matters), gradient
    checkpointing on, as train.py runs a GPU model; `blocks` keeps the first K transformer blocks."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny", torch_dtype=torch.bfloat16)
    if blocks:
        pipe.transformer.transformer_blocks = pipe.transformer.transformer_blocks[:blocks]
    params = lora.add_lora(pipe.transformer, 4, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3, generator=g)
    pipe.transformer.enable_gradient_checkpointing()
    return pipe, params


def rollouts_and_updates(pipe, params, steps):
    """`steps` of train.py's inner loop by hand: a rollout of 2 candidates (3 steps, 2 in the SDE window) under
    lora_precision, then policy_update with fixed advantages. Returns [(trajectory, stats)] per step."""
    args = train.parse_args(["--images", ".", "--reward", "recon", "--beta", "0", "--train_batch_size", "2"])
    optimizer, out = torch.optim.AdamW(params, lr=1e-2), []
    for step in range(steps):
        pipe.transformer.eval()
        with lora.lora_precision(pipe.transformer):
            traj = rollout.sample(pipe, [design()], layers=2, group_size=2, num_inference_steps=3, noise_level=1.0,
                                  resolution=64, sde_window=(0, 2), generator=torch.Generator().manual_seed(step))
        pipe.transformer.train()
        with lora.lora_precision(pipe.transformer):
            stats = train.policy_update(pipe.transformer, [traj], torch.tensor([1.0, -1.0]), args, params, optimizer)
        out.append((traj, stats))
    return out


def test_compiled_blocks_give_eager_numbers_in_bf16():
    """--compile (rollout.speed_up: regional torch.compile of the repeated block, LoRA inside) on CPU inductor,
    bf16 weights and fp32 LoRA as on a GPU: two steps of rollouts and updates give the eager run's log-probs, ratio
    and gradient norms exactly, and its trained LoRA within 1e-5 (one element of 40 tensors differed, by 5.4e-7:
    the compiled backward's summation order). Inductor is told to round where eager rounds; without that the
    log-probs differ from eager's, and with both blocks the first ratio moved by 1.3e-4, more than --clip_range. One
    transformer block, so each mode compiles one graph (about a minute on 2 cores with a cold inductor cache)."""
    eager, compiled = bf16_policy(blocks=1), bf16_policy(blocks=1)
    rollout.speed_up(compiled[0].transformer, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    a, b = rollouts_and_updates(*eager, steps=2), rollouts_and_updates(*compiled, steps=2)
    for (traj_a, stats_a), (traj_b, stats_b) in zip(a, b):
        assert torch.equal(traj_a.log_probs, traj_b.log_probs) and stats_b["diag/ratio_mean"] == 1.0
        assert stats_b["train/grad_norm"] == stats_a["train/grad_norm"] > 0
    assert max((p - q).abs().max().item() for p, q in zip(eager[1], compiled[1])) < 1e-5
    assert 2 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 3  # made in step 1, reused in 2


def test_attention_backend_keeps_the_numbers():
    """--attention_backend (rollout.speed_up through diffusers' dispatcher): the math kernel against PyTorch's SDPA
    choice on the same transitions: log-probs within 1e-3 in bf16 (measured 4.3e-4 at most: bf16 rounding inside the
    attention), and the re-scoring's ratio under the chosen backend is 1 (rollout and update run the same kernel)."""
    pipe, params = bf16_policy()
    (traj, _), = rollouts_and_updates(pipe, params, steps=1)
    pipe.transformer.eval()
    try:
        with torch.no_grad(), lora.lora_precision(pipe.transformer):
            sdpa = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
            rollout.speed_up(pipe.transformer, attention_backend="_native_math")
            math_ = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
        assert 0 < (math_ - sdpa).abs().max() < 1e-3
        (_, stats), = rollouts_and_updates(pipe, params, steps=1)
        assert float(stats["diag/ratio_mean"]) == 1.0
    finally:
        pipe.transformer.set_attention_backend("native")  # diffusers keeps the choice process-wide


def test_saved_lora_reproduces_the_trained_policy(run):
    """The final LoRA loads through diffusers' load_lora_weights, through peft, and through lora.load_lora,
    and each gives the trained policy's velocity."""
    from peft import PeftModel

    out, trained = run
    image = design()
    probe = rollout.sample(trained, [image], layers=2, num_inference_steps=2, noise_level=0, resolution=64,
                           generator=torch.Generator().manual_seed(0), decode=False)
    x, t = probe.latents[:, 0], probe.timesteps[0]
    with torch.no_grad():
        expected = rollout.predict_velocity(trained.transformer, probe, x, t)
        base = rollout.predict_velocity(rollout.load_pipeline("tiny").transformer, probe, x, t)
        assert (expected - base).abs().max() > 1e-4, "the trained LoRA must change the policy"
        via_diffusers = rollout.load_pipeline("tiny")
        via_diffusers.load_lora_weights(str(out))
        via_peft = PeftModel.from_pretrained(rollout.load_pipeline("tiny").transformer, str(out / "peft"))
        via_rollout = rollout.load_pipeline("tiny")
        lora.load_lora(via_rollout, out / "peft")
        for model in (via_diffusers.transformer, via_peft, via_rollout.transformer):
            torch.testing.assert_close(rollout.predict_velocity(model, probe, x, t), expected, rtol=0, atol=1e-6)


def test_init_lora_starts_from_it_and_is_the_kl_reference(run, image_dir, tmp_path, capsys):
    """--init_lora: the step-0 policy is base + that LoRA (velocity equal to loading it for inference), the KL of
    the first step is 0 (the reference is that starting policy, not the bare base), and the result still loads on
    the bare base model; a folder that holds no LoRA of this model exits 2."""
    start, _ = run
    out = tmp_path / "grpo"
    pipe = train.main(["--images", str(image_dir), "--output_dir", str(out), "--reward", "recon", "--layers", "2",
                       "--init_lora", str(start), "--beta", "0.04", "--max_train_steps", "1", "--sample_every", "0",
                       "--learning_rate", "1e-2", *TINY])
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["loss/kl"] == 0.0 and abs(record["diag/ratio_mean"] - 1) < 1e-5
    probe = rollout.sample(pipe, [design()], layers=2, num_inference_steps=2, noise_level=0, resolution=64,
                           generator=torch.Generator().manual_seed(0), decode=False)
    x, t = probe.latents[:, 0], probe.timesteps[0]
    with torch.no_grad(), lora.reference_policy(pipe.transformer):
        reference = rollout.predict_velocity(pipe.transformer, probe, x, t)
    from peft import PeftModel

    started, via_diffusers, via_rollout = (rollout.load_pipeline("tiny") for _ in range(3))
    lora.load_lora(started, start / "peft")
    via_diffusers.load_lora_weights(str(out))
    lora.load_lora(via_rollout, out / "peft")
    via_peft = PeftModel.from_pretrained(rollout.load_pipeline("tiny").transformer, str(out / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(reference, rollout.predict_velocity(started.transformer, probe, x, t), rtol=0,
                                   atol=1e-6)
        after = rollout.predict_velocity(pipe.transformer, probe, x, t)
        for model in (via_diffusers.transformer, via_rollout.transformer, via_peft):  # the bare base + the result
            torch.testing.assert_close(rollout.predict_velocity(model, probe, x, t), after, rtol=0, atol=1e-6)
        assert (after - reference).abs().max() > 1e-5  # one update moved the policy away from its start
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / "bad"), "--reward", "recon",
                    "--init_lora", str(image_dir), *TINY])
    assert e.value.code == 2 and "--init_lora" in capsys.readouterr().err


def test_resume_gives_the_same_run(image_dir, tmp_path):
    """Killed between checkpoints, resumed from the last one: same weights and the same log as one straight run."""
    common = ["--images", str(image_dir), "--reward", "recon", "--layers", "2", "--checkpointing_steps", "2",
              "--sample_every", "0", "--learning_rate", "1e-2", *TINY]
    train.main([*common, "--output_dir", str(tmp_path / "straight"), "--max_train_steps", "4"])
    train.main([*common, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "3"])
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-3")  # killed after step 3 was logged, before its checkpoint
    train.main([*common, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "4",
                "--resume_from_checkpoint", "latest"])
    a = load_file(tmp_path / "straight" / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rewards = [[json.loads(line)["reward/mean"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
               for d in ("straight", "resumed")]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 4


def test_learning_raises_the_reward_and_flipped_sign_lowers_it(tmp_path, monkeypatch):
    """The method works: a short run on the tiny model raises a programmatic reward (the background layer's
    opacity) measured on fixed evaluation seeds; training on the negated reward (advantages' sign flipped)
    lowers it."""
    score = reward.REWARDS["opaque_background"]
    monkeypatch.setitem(reward.REWARDS, "flipped", lambda *a, **k: (-score(*a, **k)[0], {}))
    (tmp_path / "images").mkdir()
    for i in range(4):
        design((48, 32), seed=i).save(tmp_path / "images" / f"{i}.png")
    images = [design((48, 32), seed=i) for i in range(2)]

    def evaluate(adapter=None):
        pipe = rollout.load_pipeline("tiny")
        if adapter:
            lora.load_lora(pipe, adapter)
        traj = rollout.sample(pipe, images, layers=2, group_size=8, num_inference_steps=4, noise_level=1.2,
                              resolution=64, generator=torch.Generator().manual_seed(100))
        return score(images, traj.layers, 8)[0].mean().item()

    results = {"base": evaluate()}
    for name in ("opaque_background", "flipped"):
        train.main(["--images", str(tmp_path / "images"), "--output_dir", str(tmp_path / name), "--reward", name,
                    "--layers", "2", "--max_train_steps", "20", "--checkpointing_steps", "100", "--sample_every", "0",
                    "--beta", "0", "--learning_rate", "3e-2", *TINY, "--group_size", "8"])
        results[name] = evaluate(tmp_path / name / "peft")
    print("learning test (mean background alpha, fixed seeds):", results)
    assert results["opaque_background"] > results["base"] + 0.01
    assert results["flipped"] < results["base"] - 0.01


def test_train_with_http_judge_url_alone(image_dir, tmp_path, monkeypatch):
    """The real loop against an OpenAI-compatible judge on 127.0.0.1, chosen by --judge_url alone: G + 1 requests
    per group, no failure, the grid's scores (which differ per label) become rewards with a spread; the model card
    names the base model and carries no secret from the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-in-env-42")

    def answer(body):
        keys = keys_asked(body)
        scores = {k: 7 for k in keys} if keys == KEYS else {k: 2 + 2 * i for i, k in enumerate(keys)}
        return 200, completion(json.dumps(scores))

    with judge_server(answer) as (server, url):
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--judge_url", url,
                    "--judge_model", "judge-test", "--layers", "2", "--max_train_steps", "1", "--sample_every", "1",
                    *TINY])
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["judge/requests"] == 4 + 1 and record["judge/fallbacks"] == 0
    assert record["stage1/total"] == pytest.approx(7.0) and record["reward/std"] > 1.0
    assert (tmp_path / "samples" / "step-000001.png").is_file()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
    assert {"lora", "stable-layers", "flow-grpo", "qwen-image-layered"} <= set(card.data.tags)
    text = (tmp_path / "README.md").read_text()
    assert "load_lora_weights" in text and "PeftModel.from_pretrained" in text and "samples/step-000001.png" in text
    assert "sk-secret-in-env-42" not in text and url in text
    assert ModelCard.load(tmp_path / "checkpoint-1" / "README.md").data.base_model == "tiny"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--images", ".", "--judge", "local", "--judge_url", url])
    assert e.value.code == 2


def test_a_judge_that_answers_nothing_stops_the_run_and_resume_continues(image_dir, tmp_path, monkeypatch, capsys):
    """A judge that answers HTTP 500 to every request from step 2 on: steps 2 and 3 are not trained (no optimizer
    step, no checkpoint), and with --judge_max_failed_steps 2 the run stops after step 3 with one line naming the
    judge, its last error and the checkpoint; once the judge is back, --resume_from_checkpoint latest ends where a
    run with a healthy judge ends, bit for bit."""
    monkeypatch.setattr(judges.time, "sleep", lambda seconds: None)  # the client's retry back-off: no waiting here
    down_from = {"step": None}

    def answer(body):
        if down_from["step"] is not None and len(server.posts) > down_from["step"]:
            return 500, {"error": {"message": "model crashed"}}
        keys = keys_asked(body)  # stage 1: 7 each; stage 2: by grid position, which (seed, step) shuffles
        return 200, completion(json.dumps({k: 7 for k in keys} if keys == KEYS else {k: 2 + 2 * i for i, k in
                                                                                      enumerate(keys)}))

    common = ["--reward", "vlm", "--judge_model", "judge-test", "--images", str(image_dir), "--layers", "2",
              "--sample_every", "0", "--checkpointing_steps", "1", "--max_train_steps", "3", "--learning_rate", "1e-2",
              *TINY]
    with judge_server(answer) as (server, url):
        train.main([*common, "--judge_url", url, "--output_dir", str(tmp_path / "healthy"), "--no-judge_overlap"])
        server.posts.clear()
        down_from["step"] = 5  # step 1's G + 1 = 5 requests are answered, then the judge fails
        with pytest.raises(SystemExit) as e:
            train.main([*common, "--judge_url", url, "--output_dir", str(tmp_path / "down"),
                        "--judge_max_failed_steps", "2"])
        err = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]  # not the bar, not a skip
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: the judge")
        assert f"judge-test @ {url}" in err[0] and "HTTP 500" in err[0] and "steps 2..3" in err[0]
        assert "checkpoint-1" in err[0] and "--resume_from_checkpoint latest" in err[0]
        assert [p.name for p in runs.checkpoints(tmp_path / "down")] == ["checkpoint-1"]
        rows = [json.loads(line) for line in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]  # step 2 logged (not trained); step 3 stopped the run
        assert rows[1]["judge/answered"] == 0 and rows[1]["train/skipped_updates"] == 1
        assert rows[1]["train/grad_norm"] == 0.0 and rows[0]["judge/answered"] == 5
        down_from["step"] = None  # the judge is back
        train.main([*common, "--judge_url", url, "--output_dir", str(tmp_path / "down"),
                    "--resume_from_checkpoint", "latest"])
    a, b = _lora(tmp_path / "healthy"), _lora(tmp_path / "down")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3]


def test_train_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(empty), "--output_dir", str(tmp_path / "out"), "--reward", "recon", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no readable image" in err and "Traceback" not in err
    for argv, message in [(["--group_size", "1"], "--group_size"), (["--reward", "nope"], "--reward 'nope'"),
                          (["--sde_window", "20"], "--sde_window"),
                          (["--judge_concurrency", "0"], "--judge_concurrency")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--images", str(empty), *argv])
        assert e.value.code == 2


def test_judge_overlap_gives_the_serial_loop_exactly(image_dir, tmp_path):
    """An HTTP judge on loopback with delays and failures (the first answer for some pictures is HTTP 500): each
    group judged in a thread while the next is rolled out gives the same LoRA and the same metrics as judging
    after each rollout in the main thread."""
    import hashlib

    seen, lock = set(), threading.Lock()

    def answer(body):
        time.sleep(0.05)
        digest = hashlib.sha1(image_sent(body).tobytes()).digest()
        with lock:
            first = digest not in seen
            seen.add(digest)
        if first and digest[0] % 4 == 0:
            return 500, {"error": "overloaded"}
        keys = keys_asked(body)
        return 200, completion(json.dumps({k: 1 + (digest[i] % 9) for i, k in enumerate(keys)}))

    out = {}
    with judge_server(answer) as (server, url):
        for mode in ("--judge_overlap", "--no-judge_overlap"):
            seen.clear()
            out[mode] = tmp_path / mode.strip("-")
            train.main(["--images", str(image_dir), "--output_dir", str(out[mode]), "--judge_url", url,
                        "--judge_model", "judge-test", "--layers", "2", "--max_train_steps", "2", "--sample_every", "0",
                        *TINY, "--images_per_step", "2", mode])
    rows = {m: [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
                for line in (o / "metrics.jsonl").read_text().splitlines()] for m, o in out.items()}
    assert rows["--judge_overlap"] == rows["--no-judge_overlap"]
    assert sum(r["judge/retries"] for r in rows["--judge_overlap"]) > 0 and rows["--judge_overlap"][0]["reward/std"] > 0
    a, b = (_lora(o) for o in out.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overlapped_judge_spans_the_groups_and_the_update_follows_the_last_answer(image_dir, tmp_path, monkeypatch):
    """Overlapped, a step's groups are with the judge at once (the default bound on requests in flight is a step's,
    so no group waits for a slot; --judge_concurrency caps it) and the update starts after the last answer (the
    advantages need every reward, with either --adv_std); the LoRA equals judging after each rollout."""
    answered, started, in_flight, lock = [], [], [0, 0], threading.Lock()  # in_flight: now, most
    real = rollout.step_log_prob

    def step_log_prob(*a, **k):
        started.append(time.monotonic())
        return real(*a, **k)

    def answer(body):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        time.sleep(0.5)
        with lock:
            in_flight[0] -= 1
        answered.append(time.monotonic())
        return 200, completion(json.dumps({k: 1 + (len(k) + i) % 9 for i, k in enumerate(keys_asked(body))}))

    monkeypatch.setattr(rollout, "step_log_prob", step_log_prob)
    with judge_server(answer) as (server, url):
        for adv_std in ("group", "global"):
            for mode in ("--judge_overlap", "--no-judge_overlap"):
                answered.clear(), started.clear()
                in_flight[1] = 0
                train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / adv_std / mode), "--judge_url",
                            url, "--judge_model", "judge-test", "--layers", "2", "--max_train_steps", "1",
                            "--sample_every", "0", *TINY, "--images_per_step", "3", "--adv_std", adv_std, mode])
                assert len(answered) == 3 * 5 and started[0] > max(answered)  # 3 groups: 4 panels and a grid each
                assert in_flight[1] > 5 if mode == "--judge_overlap" else in_flight[1] == 5
            a, b = (_lora(tmp_path / adv_std / m) for m in ("--judge_overlap", "--no-judge_overlap"))
            assert all(torch.equal(a[k], b[k]) for k in a)
        in_flight[1] = 0
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / "bound"), "--judge_url", url,
                    "--judge_model", "judge-test", "--layers", "2", "--max_train_steps", "1", "--sample_every", "0",
                    *TINY, "--images_per_step", "2", "--judge_concurrency", "3"])
        assert in_flight[1] == 3


def test_train_errors_bad_input_one_line_bugs_keep_their_traceback(image_dir, tmp_path, monkeypatch, capsys):
    """Bad input (a missing folder, --sde_window = T, --images_per_step not a multiple of the ranks) is one line
    and exit 2; an exception raised by a (forked) reward inside the loop reaches the top with its traceback."""
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(tmp_path / "nope"), "--reward", "recon", *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--images", ".", "--num_inference_steps", "4", "--sde_window", "4"])
    assert e.value.code == 2 and "last step" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in my reward")

    monkeypatch.setitem(reward.REWARDS, "broken", broken)
    with pytest.raises(RuntimeError, match="shape mismatch in my reward"):
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path / "out"), "--reward", "broken", *TINY])


def test_out_of_memory_gives_one_actionable_line(image_dir, tmp_path, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "policy_update", oom)
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--reward", "recon", *TINY])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert e.value.code == 2 and err.startswith("error: CUDA out of memory")
    assert "during the update" in err and "--train_batch_size 1" in err and "--resume_from_checkpoint" in err


def test_cps_with_the_kl_trains_every_step_and_window_0_stops_before_the_last(image_dir, tmp_path):
    """CPS has std 0 on the last step (sigma_next = 0): the window never holds it, so the KL stays finite and no
    update is skipped; --sde_window 0 trains steps 0..T-2."""
    train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--reward", "recon", "--layers", "2",
                "--sde_type", "cps", "--noise_level", "0.7", "--beta", "0.04", "--sde_window", "0", "--clip_range",
                "1e-5", "--max_train_steps", "2", "--sample_every", "0", *TINY])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["window"] for r in records] == [[0, 3], [0, 3]]  # T = 4: steps 0, 1, 2
    assert all(r["train/skipped_updates"] == 0 and math.isfinite(r["loss/kl"]) for r in records)
    assert records[1]["loss/kl"] > 0  # after one update the policy has left the reference


def test_advantages_use_upstream_global_std_over_the_step():
    """Two images, the second with near-equal rewards: upstream centres per image and divides by the std of all
    the step's rewards, which keeps the near-tie small; the per-group std blows it up to +-1."""
    r = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.001], dtype=np.float32)
    groups = r.reshape(2, 4)
    upstream = ((groups - groups.mean(1, keepdims=True)) / (r.std() + 1e-4)).reshape(-1)  # np.std: ddof 0
    ours = grpo.group_advantages(torch.tensor(r), 4, global_std=True)
    np.testing.assert_allclose(ours.numpy(), np.clip(upstream, -5, 5), rtol=0, atol=1e-6)
    assert ours[4:].abs().max() < 1e-3
    per_group = grpo.group_advantages(torch.tensor(r), 4, global_std=False)
    assert per_group[7].item() == pytest.approx(0.75 * 0.001 / (np.std(r[4:]) + 1e-4), rel=1e-3)
    assert per_group[4:].abs().max() > 1.0
    assert train.parse_args(["--images", "."]).adv_std == "global" == train.UPSTREAM["adv_std"]


def test_departures_table_is_the_defaults():
    """The departures table in train.py's docstring is the truth: every flag with an upstream value either keeps
    it as its default or has a row whose `upstream` and `here` columns are upstream's value and the default;
    docs/training.md shows the same table."""
    table = [line for line in train.__doc__.splitlines() if line.startswith("|")]  # header, |---|, rows
    rows = {cells[0].strip("`"): cells[1:3] for cells in ([c.strip() for c in line.strip("|").split("|")]
                                                          for line in table[2:])}
    args = train.parse_args(["--images", "."])
    for flag, upstream in train.UPSTREAM.items():
        default = getattr(args, flag)
        if default == upstream:
            assert f"--{flag}" not in rows, f"--{flag} keeps upstream's {upstream} but has a row"
        else:
            assert rows.get(f"--{flag}") == [str(upstream), str(default)], f"--{flag}: {default} vs {upstream}"
    assert all(name in {f"--{f}" for f in train.UPSTREAM} for name in rows if name.startswith("--"))
    assert "\n".join(table) in (Path(__file__).parent / "docs" / "training.md").read_text()


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


def test_report_to_tensorboard_matches_metrics_jsonl(image_dir, tmp_path):
    train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--reward", "recon", "--layers", "2",
                "--max_train_steps", "2", "--sample_every", "2", *TINY, "--report_to", "tensorboard"])
    scalars, images = _tensorboard_scalars(tmp_path / "logs")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ["reward/mean", "loss/policy", "diag/ratio_mean", "recon/l1", "time/train_s"]:
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in records], key
    assert images == ["samples/group"]


def _wandb_history(run_file):
    """The history rows of an offline wandb run file: a LevelDB-style log (7-byte header, 32 KiB blocks of records
    with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, rows, pos, part = Path(run_file).read_bytes(), [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        part += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == 0:
            break
    return rows


def test_report_to_wandb_offline_matches_metrics_jsonl(image_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="--report_to wandb is optional; requirements.txt installs it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--reward", "recon", "--layers", "2",
                "--max_train_steps", "2", "--sample_every", "1", *TINY, "--report_to", "wandb"])
    history = _wandb_history(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {row["_step"]: row for row in history}
    for r in records:
        for key in ["reward/mean", "loss/policy", "recon/l1"]:
            assert logged[r["step"]][key] == pytest.approx(r[key], rel=1e-9), key
        assert logged[r["step"]]["samples/group/_type"] == "image-file"


def test_one_run_per_output_dir_and_kill_leaves_no_lock(image_dir, tmp_path):
    """A second run on a busy folder exits non-zero at once (before loading a model) with one line; the first logs
    exactly one row per step; a run killed with SIGKILL leaves no stale lock (the OS drops it), so the next run
    resumes. The first run is long enough never to end by itself (a fast machine once finished 40 steps before the
    second one started)."""
    out = tmp_path / "run"
    argv = [sys.executable, "train.py", "--images", str(image_dir), "--output_dir", str(out), "--reward", "recon",
            "--layers", "2", "--max_train_steps", "100000", "--sample_every", "0", "--checkpointing_steps", "1", *TINY]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "LoRA parameters" not in second.stdout  # stopped before loading anything
        assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # it held the lock all along
        first.kill()  # SIGKILL in the middle of the run
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    done = int(runs.checkpoints(out)[-1].name.split("-")[1])  # the last checkpoint's step
    train.main([*argv[2:-len(TINY) - 2], "--max_train_steps", str(done + 1), *TINY, "--resume_from_checkpoint",
                "latest"])  # in this process: the killed one's lock is gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))
    state = torch.load(out / f"checkpoint-{done + 1}" / "training_state.pt", weights_only=True)
    assert state["step"] == done + 1 and "rng" not in state


def _torchrun(nproc, argv, timeout=240, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(_free_port()), "train.py", *argv],
                          capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora(folder):
    return load_file(Path(folder) / "peft" / "adapter_model.safetensors")


def test_torchrun_two_ranks_equal_one_process_and_resume_with_any_world_size(image_dir, tmp_path):
    """gloo on CPU: 2 ranks x 1 image per step train the LoRA of 1 process x 2 images; a 2-rank run stopped at
    step 2 resumes to 4 on 1 rank, equal to 4 uninterrupted steps; only rank 0 writes. (Resuming on the same number
    of ranks is test_resume_gives_the_same_run's case: the checkpoint holds nothing rank-specific.) The one-process
    runs are in this process (one thread, as the ranks have)."""
    common = ["--images", str(image_dir), "--reward", "recon", "--layers", "2", "--sample_every", "2",
              "--checkpointing_steps", "1", "--checkpoints_total_limit", "10", *TINY, "--images_per_step", "2"]
    train.main([*common, "--output_dir", str(tmp_path / "one"), "--max_train_steps", "4"])
    two = _torchrun(2, [*common, "--output_dir", str(tmp_path / "two"), "--max_train_steps", "2"])
    assert two.returncode == 0, two.stderr[-800:]
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    train.main([*common, "--output_dir", str(tmp_path / "two_then_one"), "--max_train_steps", "4",
                "--resume_from_checkpoint", "latest"])
    ref = {k: _lora(tmp_path / "one" / f"checkpoint-{s}") for k, s in (("2", 2), ("4", 4))}
    two_at_2 = _lora(tmp_path / "two" / "checkpoint-2")
    dw = max((ref["2"][k] - two_at_2[k]).abs().max().item() for k in ref["2"])
    print(f"world-size invariance: max |dW| after 2 steps = {dw:.2e}")
    assert dw <= 1e-6
    final = _lora(tmp_path / "two_then_one")
    assert max((ref["4"][k] - final[k]).abs().max().item() for k in final) <= 1e-6
    ref_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for folder, steps in (("two", 2), ("two_then_one", 4)):
        rows = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, steps + 1))  # one row per step: only rank 0 writes
        assert [r["reward/mean"] for r in rows] == pytest.approx([r["reward/mean"] for r in ref_rows[:steps]],
                                                                 abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step-000002.png"]
    bad = _torchrun(2, [*common, "--output_dir", str(tmp_path / "odd"), "--images_per_step", "3"])
    assert bad.returncode != 0 and "multiple of the number of ranks (2)" in bad.stderr


def test_torchrun_a_killed_rank_stops_the_job(image_dir, tmp_path):
    import psutil

    argv = ["--images", str(image_dir), "--reward", "recon", "--layers", "2", "--sample_every", "0",
            "--output_dir", str(tmp_path), "--max_train_steps", "500", *TINY, "--images_per_step", "2"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(_free_port()), "train.py", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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


# ----------------------------------------------------------------------------- reward
KEYS = ["separation", "alpha", "inpainting", "distribution", "validity"]


@pytest.fixture(scope="module")
def tiny_judge():
    return reward.load_judge("tiny")


@contextmanager
def one_thread():
    """Models this small run several times faster on one CPU thread (as the tiny judge does itself)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _layers(g, n=3, h=24, w=32, seed=0):
    torch.manual_seed(seed)
    return torch.rand(g, n, 4, h, w)


# ------------------------------------------------------------------------------------- a real HTTP judge


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(self.server.models_status, {"object": "list", "data": [{"id": "judge-test"}]})
        self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.posts.append(body)
            self.server.auth.append(self.headers.get("Authorization"))
        status, payload = self.server.answer(body)
        self._send(status, payload)


@contextmanager
def judge_server(answer, models_status=200):
    """Serve /v1/models and /v1/chat/completions on an ephemeral port; answer(body) -> (status, payload)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.block_on_close = True, False
    srv.answer, srv.models_status, srv.lock, srv.posts, srv.auth = answer, models_status, threading.Lock(), [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def keys_asked(body):  # the JSON fields the prompt's answer format asks for
    text = body["messages"][0]["content"][1]["text"]
    return re.findall(r'"(\w+)": <1-9>', text)


def image_sent(body):
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def completion(text, tops=None):
    """A chat completion whose logprobs split the text into one-character tokens; tops maps a character
    index to its top_logprobs [(token, probability)]."""
    content = [{"token": ch, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": math.log(p)}
                                                             for t, p in (tops or {}).get(i, [])]}
               for i, ch in enumerate(text)]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": {"content": content} if tops is not None else None}]}


def http_judge(url, **options):
    return reward.load_judge("http", model="judge-test", url=url, backoff=0.01, panel_size=96, grid_size=160,
                             **options)


def test_http_good_answers_use_top_logprobs_weights_and_key(monkeypatch, caplog):
    stage1 = {"separation": 9, "alpha": 7, "inpainting": 5, "distribution": 3, "validity": 1}

    def answer(body):
        keys = keys_asked(body)
        if keys == KEYS:  # only the alpha digit carries top logprobs: 7 and 6 at p = 0.5 each -> 6.5
            text = json.dumps(stage1)
            return 200, completion(text, {text.index('"alpha": ') + 9: [("7", 0.5), (" 6", 0.5), ("x", 0.9)]})
        text = json.dumps({k: 9 - i for i, k in enumerate(keys)})  # A=9, B=8, ... each with E = digit - 0.25
        return 200, completion(text, {text.index(f'"{k}": ') + 5: [(str(9 - i), 0.75), (str(8 - i), 0.25)]
                                      for i, k in enumerate(keys)})

    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret-123")
    with judge_server(answer) as (srv, url):
        judge = http_judge(url, api_key_env="JUDGE_TEST_KEY")
        images = [Image.new("RGB", (32, 24), c) for c in ("red", "blue")]
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge, seed=3)
        assert info["stage1/separation"] == 9.0 and info["stage1/alpha"] == pytest.approx(6.5)
        assert info["stage1/total"] == pytest.approx((9 + 6.5 + 5 + 3 + 1) / 5)
        positions = ["ABCD".index(c["label"]) for c in info["candidates"]]
        assert rewards.tolist() == pytest.approx([9 - p - 0.25 for p in positions])
        assert info["judge/requests"] == 10 and info["judge/retries"] == 0 and info["judge/fallbacks"] == 0
        mean_r, _ = reward.vlm_reward(images, _layers(8), 4, judge=judge, seed=3, combine="mean")
        assert mean_r.tolist() == pytest.approx([(4.9 + 9 - p - 0.25) / 2 for p in positions])
        w_r, w_info = reward.vlm_reward(images, _layers(8), 4, judge=judge, combine="stage1",
                                        weights={"separation": 3})
        assert w_r.tolist() == pytest.approx([(27 + 6.5 + 5 + 3 + 1) / 7] * 8)
        assert w_info["judge/requests"] == 8  # stage1 mode sends no grid
        assert set(srv.auth) == {"Bearer sk-test-secret-123"}
        assert all(b["temperature"] == 0 and b["logprobs"] is True for b in srv.posts)
    assert "sk-test-secret" not in repr(judge) + repr(info) + caplog.text


def test_http_garbage_falls_back_and_counts():
    bad = [(200, completion("I'm sorry, I can't rate images.")),
           (200, completion('{"separation": 5, "alpha": 5}')),  # fields missing
           (200, completion('{"A": 10, "B": 0, "C": 5, "D": 5, "separation": 12, "alpha": 0, "inpainting": 5, '
                            '"distribution": 5, "validity": 5}')),  # out of range
           (200, {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "no"}}]}),
           (200, b"<html>not json</html>"), (200, {"choices": []}), (200, {"error": "overloaded"})]
    count = [0]

    def answer(body):
        if mode[0] == "stage2_only" and keys_asked(body) == KEYS:
            return 200, completion(json.dumps({k: 6 for k in KEYS}))
        count[0] += 1
        return bad[count[0] % len(bad)]

    mode = ["all"]
    with judge_server(answer) as (srv, url):
        judge = http_judge(url, max_retries=2)
        images = [Image.new("RGB", (32, 24), "white")] * 2
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge)
        assert rewards.tolist() == [5.0] * 8  # mid-scale for everyone: zero advantage
        assert (info["judge/failed_stage1"], info["judge/failed_stage2"], info["judge/fallbacks"]) == (8, 2, 8)
        assert len(srv.posts) == info["judge/requests"] == 10 * 3 and info["judge/retries"] == 20
        assert info["judge/answered"] == 0 and info["judge_last_error"]  # what train.py stops on, and names
        assert all(c["stage1"] is None and c["stage2"] is None and c["fallback"] for c in info["candidates"])
        mode[0] = "stage2_only"
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge)
        assert rewards.tolist() == [6.0] * 8  # stage 1 stands in for the failed grids
        assert (info["judge/failed_stage1"], info["judge/failed_stage2"], info["judge/fallbacks"]) == (0, 2, 8)
        assert info["judge/answered"] == 8  # the 8 panels, not the 2 grids
        assert all(np.isfinite(v) for k, v in info.items() if k not in ("candidates", "judge_last_error"))


def test_http_500_then_success_and_logprobs_rejected():
    seen, lock = {}, threading.Lock()

    def answer(body):
        key = json.dumps(body["messages"], sort_keys=True)
        with lock:
            seen[key] = seen.get(key, 0) + 1
            first = seen[key] == 1
        if first:
            return 500, {"error": "try again"}
        if "logprobs" in body:
            return 400, {"error": "logprobs not supported"}
        return 200, completion(json.dumps({k: 4 for k in keys_asked(body)}))

    with judge_server(answer) as (srv, url):
        judge = http_judge(url, max_retries=3)
        t0 = time.perf_counter()
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "gray")], _layers(4), 4, judge=judge)
        assert time.perf_counter() - t0 < 5
    assert rewards.tolist() == [4.0] * 4 and info["judge/fallbacks"] == 0
    assert info["judge/retries"] == 5  # every query's 500 was retried once (the 400 retry is free)
    assert sum("logprobs" in b for b in srv.posts) >= 1 and "logprobs" not in srv.posts[-1]


def test_http_slow_server_times_out_in_bounded_time():
    def answer(body):
        time.sleep(5.0)
        return 200, completion(json.dumps({k: 8 for k in keys_asked(body)}))

    with judge_server(answer) as (srv, url):
        judge = http_judge(url, timeout=0.3, max_retries=1)
        t0 = time.perf_counter()
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "gray")], _layers(4), 4, judge=judge)
        elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, elapsed  # did not wait for the 5 s answers
    assert rewards.tolist() == [5.0] * 4
    assert info["judge/requests"] == 10 and info["judge/failed_stage1"] == 4 and info["judge/failed_stage2"] == 1


def test_http_judge_fails_at_startup_with_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"--judge_url .*cannot reach"):
        reward.load_judge("http", model="m", url=f"http://127.0.0.1:{dead_port}/v1")
    assert time.perf_counter() - t0 < 5
    with judge_server(lambda b: (200, {}), models_status=401) as (_, url):
        with pytest.raises(ValueError, match=r"HTTP 401.*MY_KEY"):
            reward.load_judge("http", model="judge-test", url=url, api_key_env="MY_KEY")
    with judge_server(lambda b: (200, {})) as (_, url):
        with pytest.raises(ValueError, match=r"--judge_model nope: not served"):
            reward.load_judge("http", model="nope", url=url)
        assert reward.load_judge("http", url=url).name.startswith("judge-test")  # the only model served


# ------------------------------------------------------------------------------------------- grid shuffle

COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 0, 255)]


def _coloured_group():
    """4 candidates, each with a white background layer and one big square of its own colour."""
    layers = torch.zeros(4, 2, 4, 32, 32)
    layers[:, 0] = 1.0
    for k, c in enumerate(COLORS):
        layers[k, 1, :3] = torch.tensor(c).view(3, 1, 1) / 255
        layers[k, 1, 3, 4:28, 4:28] = 1.0
    return [Image.new("RGB", (32, 32), (128, 128, 128))], layers


def test_grid_shuffle_rewards_follow_candidates_not_positions():
    quality = {0: 2, 1: 9, 2: 4, 3: 7}  # what the "seeing" judge thinks of each candidate

    def answer(body):
        keys = keys_asked(body)
        if keys == KEYS:
            return 200, completion(json.dumps({k: 5 for k in keys}))
        px = np.asarray(image_sent(body), np.int32)
        scores = {}
        for p, label in enumerate(keys):  # one panel per horizontal band; find its colour
            band = px[p * px.shape[0] // 4:(p + 1) * px.shape[0] // 4].reshape(-1, 3)
            band = band[band.max(1) - band.min(1) > 150]
            votes = np.argmin(((band[:, None, :] - np.array(COLORS)[None]) ** 2).sum(-1), 1)
            scores[label] = quality[int(np.bincount(votes, minlength=4).argmax())] if mode[0] == "see" else 9 - p
        return 200, completion(json.dumps(scores))

    images, layers = _coloured_group()
    mode = ["see"]
    with judge_server(answer) as (_, url):
        judge = http_judge(url)
        orders = set()
        for seed in range(4):
            rewards, info = reward.vlm_reward(images, layers, 4, judge=judge, seed=seed)
            orders.add("".join(c["label"] for c in info["candidates"]))
            assert rewards.tolist() == [quality[k] for k in range(4)], (seed, info["candidates"])
        assert len(orders) > 1  # the seeds really moved the candidates around
        mode[0] = "position"  # a judge with pure position bias: A=9, B=8, ...
        by_seed = []
        for seed in range(4):
            rewards, info = reward.vlm_reward(images, layers, 4, judge=judge, seed=seed)
            assert rewards.tolist() == [9 - "ABCD".index(c["label"]) for c in info["candidates"]]
            by_seed.append(rewards)
        assert len({tuple(r.tolist()) for r in by_seed}) > 1  # the bias lands on different candidates


# ------------------------------------------------------------------------------------------- tiny judge


def test_tiny_judge_end_to_end_group_of_4(tiny_judge, tmp_path):
    images = [Image.new("RGB", (32, 24), "orange"), Image.new("RGB", (40, 30), "teal")]
    layers = _layers(8)
    rewards, info = reward.vlm_reward(images, layers, 4, judge=tiny_judge, seed=7, save_dir=tmp_path)
    assert rewards.shape == (8,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    expected_keys = {f"stage1/{k}" for k in KEYS} | {
        "stage1/total", "stage1/group_std", "stage2/score", "stage2/group_std", "reward/mean", "judge/failed_stage1",
        "judge/failed_stage2", "judge/fallbacks", "judge/requests", "judge/retries", "time/judge_s", "time/reward_s"}
    assert expected_keys <= set(info) and all(isinstance(info[k], float) and math.isfinite(info[k])
                                              for k in expected_keys)
    assert info["judge/requests"] == 2  # one batched generate per stage, not one call per candidate
    assert len(info["candidates"]) == 8
    for b, c in enumerate(info["candidates"]):
        assert set(c["criteria"]) == set(KEYS) and c["reward"] == pytest.approx(float(rewards[b]))
        if not c["fallback"]:
            assert c["reward"] == pytest.approx(c["stage2"])
        assert 1 <= c["stage1"] <= 9 and c["stage1"] != round(c["stage1"])  # an expectation, not a digit
    again, info2 = reward.vlm_reward(images, layers, 4, judge=tiny_judge, seed=7, combine="stage1")
    assert info2["judge/requests"] == 1
    assert again.tolist() == pytest.approx([c["stage1"] for c in info["candidates"]], abs=1e-5)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved.count("stage2_grid_00.png") == 1 and len([s for s in saved if s.startswith("stage1_panel")]) == 8
    with Image.open(tmp_path / "stage2_grid_01.png") as grid:
        assert max(grid.size) <= tiny_judge.grid_size


def test_qwen3_5_judge_names_its_missing_fast_kernels_once(caplog):
    """The default judge's architecture (Qwen3.5: linear-attention layers) on CUDA without flash-linear-attention
    and causal-conv1d: one warning line naming what to install; nothing on CPU or for a full-attention model."""
    from transformers import Qwen2_5_VLConfig, Qwen3_5Config

    import importlib.util
    missing = [m for m in ("fla", "causal_conv1d") if importlib.util.find_spec(m) is None]
    with caplog.at_level("WARNING", logger="reward"):
        assert judges.warn_slow_kernels(Qwen3_5Config(), "cuda:0") == bool(missing)
        assert not judges.warn_slow_kernels(Qwen3_5Config(), "cpu")
        assert not judges.warn_slow_kernels(Qwen2_5_VLConfig(), "cuda:0")
    lines = [r.getMessage() for r in caplog.records]
    pip_name = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}
    assert len(lines) == bool(missing) and all("pip install" in line and all(pip_name[m] in line for m in missing)
                                               for line in lines)


def test_judge_offload_keeps_the_scores(tiny_judge):
    """A local judge whose weights live in CPU memory and visit its device only while scoring (train.py's
    --judge_offload) scores exactly as the resident one. On this CPU-only machine both places are the CPU, so this
    checks the path and the scores; the memory it saves is a GPU figure (docs/performance.md)."""
    offloaded = reward.load_judge("tiny", offload_to="cpu")
    images, layers = [Image.new("RGB", (32, 24), "orange")], _layers(4)
    a, _ = reward.vlm_reward(images, layers[:4], 4, judge=tiny_judge, seed=3)
    b, _ = reward.vlm_reward(images, layers[:4], 4, judge=offloaded, seed=3)
    assert torch.equal(a, b)


def test_local_judge_loads_a_saved_folder(tiny_judge, tmp_path):
    model, tok, ip = tiny.tiny_judge(seed=0)
    for part in (model, tok, ip):
        part.save_pretrained(tmp_path)
    local = reward.load_judge("local", model=str(tmp_path), device="cpu", panel_size=128)
    images, layers = [Image.new("RGB", (32, 24), "orange")], _layers(2)
    with one_thread():
        r_local, _ = reward.vlm_reward(images, layers, 2, judge=local, combine="stage1")
    r_tiny, _ = reward.vlm_reward(images, layers, 2, judge=tiny_judge, combine="stage1")
    assert torch.allclose(r_local, r_tiny, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="--judge_model /no/such/judge"):
        reward.load_judge("local", model="/no/such/judge")
    # the pipeline's text encoder as judge, with a tokenizer whose chat template knows no images (-> ChatML)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    reuse = reward.load_judge("text_encoder", text_encoder=model, tokenizer=tok, panel_size=128)
    with one_thread():
        r_reuse, _ = reward.vlm_reward(images, layers, 2, judge=reuse, combine="stage1")
    assert torch.allclose(r_reuse, r_tiny, atol=1e-5)
    with pytest.raises(ValueError, match="text_encoder needs"):
        reward.load_judge("text_encoder", text_encoder=model.model, tokenizer=tok)  # no lm_head: cannot answer


def test_local_judge_runs_a_hybrid_attention_qwen3_5(tmp_path):
    """The released model's judge family (Qwen3.5: linear + full attention, 16 px patches), tiny and random."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    _, tok, _ = tiny.tiny_judge()
    ids = {s: tok.convert_tokens_to_ids(s) for s in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
    config = Qwen3_5Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_key_head_dim=8,
                         linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                          "mrope_interleaved": True, "partial_rotary_factor": 0.5},
                         pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=16, num_position_embeddings=64),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    for part in (Qwen3_5ForConditionalGeneration(config), tok, Qwen2VLImageProcessorPil(patch_size=16)):
        part.save_pretrained(tmp_path)
    judge = reward.load_judge("local", model=str(tmp_path), device="cpu", panel_size=96, grid_size=96)
    with one_thread():
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "red")], _layers(4), 4, judge=judge)
    assert info["judge/requests"] == 2 and info["judge/fallbacks"] == 0 and torch.isfinite(rewards).all()
    assert len({round(c["stage2"], 6) for c in info["candidates"]}) > 1  # read from logits, per candidate


# ---------------------------------------------------------------------------------- scores and parsing


def test_expected_score_on_crafted_logits():
    digit_ids = [10 + d for d in range(9)]  # token 10 is "1", ..., token 18 is "9"
    logits = torch.full((4, 32), -1e4)
    logits[0, 16] = 0.0  # all mass on "7"
    logits[1, digit_ids] = 0.0  # uniform over 1..9 -> 5
    logits[2, [11, 17]] = 0.0  # "2" and "8" equally likely -> 5
    logits[2, 0] = 50.0  # a huge non-digit logit is ignored (renormalised over the digits)
    logits[3, [12, 13]] = torch.tensor([0.0, math.log(3.0)])  # p(3) = 1/4, p(4) = 3/4 -> 3.75
    assert judges.expected_score(logits, digit_ids).tolist() == pytest.approx([7.0, 5.0, 5.0, 3.75])
    top = [{"token": " 3", "logprob": math.log(0.2)}, {"token": "4", "logprob": math.log(0.6)},
           {"token": "x", "logprob": math.log(0.15)}, {"token": "10", "logprob": -1.0}]
    assert judges.expected_from_top_logprobs(top) == pytest.approx((3 * 0.2 + 4 * 0.6) / 0.8)
    assert judges.expected_from_top_logprobs([{"token": "yes", "logprob": 0.0}]) is None
    # unicode digits that are not ASCII ("²", "٣") are ignored, not crashed on
    top = [{"token": "²", "logprob": 0.0}, {"token": "٣", "logprob": 0.0}, {"token": " 4", "logprob": math.log(0.5)}]
    assert judges.expected_from_top_logprobs(top) == 4.0


GOOD = {k: v for k, v in zip(KEYS, [7, 3, 9, 1, 5])}


@pytest.mark.parametrize("text, expected", [
    (json.dumps(GOOD), GOOD),
    ("```json\n" + json.dumps(GOOD) + "\n```", GOOD),
    ("Sure! Here are my scores: " + json.dumps(GOOD) + " Hope this helps.", GOOD),
    ('{"scores": {"Separation": 7, "ALPHA": "3", "inpainting": 9.0, "distribution": 1, "validity": 5}}', GOOD),
    ("{'separation': 7, 'alpha': 3, 'inpainting': 9, 'distribution': 1, 'validity': 5,}", GOOD),
    ("separation: 7\nalpha = 3\ninpainting: 9/9\ndistribution: 1\nvalidity: 5", GOOD),
    ('{"separation": 7, "alpha": 3, "inpainting": 9, "distribution": 1}', None),  # missing field
    ('{"separation": 7, "alpha": 3, "inpainting": 10, "distribution": 1, "validity": 5}', None),  # out of range
    ('{"separation": 0, "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
    ('{"separation": true, "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
    ('{"separation": "high", "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
    ("I'm sorry, but I can't help with evaluating this image.", None),
    ("", None),
    (None, None),
])
def test_parse_scores_table(text, expected):
    got = judges.parse_scores(text, KEYS)
    assert got == (None if expected is None else {k: float(v) for k, v in expected.items()})


def test_parse_grid_labels_are_case_sensitive():
    assert judges.parse_scores("Candidate A: 8, B: 2, C: 5", ["A", "B", "C"]) == {"A": 8.0, "B": 2.0, "C": 5.0}
    assert judges.parse_scores("data: 8, b: 2, c: 5", ["A", "B", "C"]) is None


# ------------------------------------------------------------------------------ programmatic rewards


def test_programmatic_rewards_known_answers():
    white = Image.new("RGB", (8, 8), "white")
    layers = torch.zeros(4, 3, 4, 8, 8)  # 2 images x G=2, N=3
    layers[:, 0, 3] = 1.0  # opaque black background everywhere
    layers[0, 1, :, :, :] = 1.0  # candidate 0: opaque white layer 1 -> composite = white, exact
    layers[1, 1, :3], layers[1, 1, 3] = 1.0, 0.5  # candidate 1: white at alpha 0.5 over black -> 0.5 grey
    layers[2, 1, :3, :4], layers[2, 1, 3, :4] = 1.0, 1.0  # candidate 2: top half white
    layers[3, 1, :, :4] = 1.0
    layers[3, 2] = layers[3, 1]  # candidate 3: layer 2 duplicates layer 1
    r, info = reward.REWARDS["recon"]([white, white], layers, 2, judge="ignored", seed=1)
    assert r.tolist() == pytest.approx([0.0, -0.5, -0.5, -0.5]) and info["recon/l1"] == pytest.approx(0.375)
    r, info = reward.REWARDS["layer_usage"]([white, white], layers, 2, judge="ignored", seed=1)
    assert r.tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, -1 / 3])  # 0-2: layer 2 blank; 3: duplicate
    assert info["layer_usage/blank"] == pytest.approx(0.75) and info["layer_usage/duplicate"] == pytest.approx(0.25)
    layers[2, 2, :3, 4:], layers[2, 2, 3, 4:] = 0.2, 1.0  # candidate 2 fills layer 2 with other content
    assert reward.REWARDS["layer_usage"]([white, white], layers, 2)[0][2] == 0.0
    with pytest.raises(ValueError, match="group_size"):
        reward.REWARDS["recon"]([white], layers, 2)


def test_render_panel_and_grid():
    layers = torch.zeros(2, 2, 4, 16, 16)
    layers[:, 0, 0], layers[:, 0, 3] = 1.0, 1.0  # opaque red background; layer 1 fully transparent
    panel = np.asarray(reward.render_candidate_panel(Image.new("RGB", (16, 16), "blue"), layers[0], tile=64))
    assert panel.shape[1] == 2 + 3 * (64 + 2)  # pad + 3 tiles of 64 (+2 px gaps), no label column
    y = 2 + 10 + 32  # middle of the tiles
    assert tuple(panel[y, 2 + 32]) == (0, 0, 255) and tuple(panel[y, 2 + 66 + 32]) == (255, 0, 0)
    checker = panel[2 + 10:2 + 10 + 64, 2 + 2 * 66:2 + 2 * 66 + 64].reshape(-1, 3)
    assert {tuple(v) for v in np.unique(checker, axis=0)} == {(204, 204, 204), (255, 255, 255)}
    captioned = reward.render_candidate_panel(Image.new("RGB", (16, 16)), layers[0], "A", "r=5.0\nok", tile=64)
    assert captioned.height > panel.shape[0] and captioned.width == panel.shape[1] + 16
    grid = reward.render_group_grid(Image.new("RGB", (16, 16)), layers, ["A", "B"], tile=64)
    assert grid.size == (captioned.width, 2 * (panel.shape[0]) + 4)


# ------------------------------------------------------------------------------------------------- CLI


def _write_layout(root, g=4):
    """rollout.py's layout: root/<stem>/image.png, root/<stem>/candidate_<kk>/layer_<i>.png."""
    group = root / "poster"
    group.mkdir(parents=True)
    Image.new("RGB", (24, 16), (250, 250, 250)).save(group / "image.png")
    for k in range(g):
        (group / f"candidate_{k:02d}").mkdir()
        for i in range(2):
            a = np.zeros((16, 24, 4), np.uint8)
            a[..., :3], a[..., 3] = (250, 250, 250) if k == 0 else (40 * k, 0, 0), 255 if i == 0 else 0
            Image.fromarray(a, "RGBA").save(group / f"candidate_{k:02d}" / f"layer_{i}.png")


def test_cli_prints_scores_and_saves_what_the_judge_saw(tmp_path, capsys):
    _write_layout(tmp_path / "out")
    reward.main(["--decompositions", str(tmp_path / "out"), "--judge", "tiny", "--output_dir", str(tmp_path / "v")])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    header = next(line for line in lines if line[:2] == ["group", "cand"])
    assert header[2] == "label" and {"stage1", "stage2", "reward", "fallback", *KEYS} <= set(header)
    rows = [line for line in lines if line and line[0] == "poster"]
    assert [r[1] for r in rows] == ["00", "01", "02", "03"]
    assert all(1 <= float(r[header.index("reward")]) <= 9 for r in rows)
    with Image.open(tmp_path / "v" / "poster" / "stage2_grid_00.png") as grid:
        assert max(grid.size) <= 128
    reward.main(["--decompositions", str(tmp_path / "out"), "--reward", "recon"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["poster"]]
    assert [float(r[-1]) for r in rows][0] == 0.0 and all(float(r[-1]) < -0.1 for r in rows[1:])


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"error: --decompositions .*no such folder"):
        reward.main(["--decompositions", str(tmp_path / "missing")])
    (tmp_path / "empty" / "x").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no <stem>/image.png"):
        reward.main(["--decompositions", str(tmp_path / "empty"), "--reward", "recon"])
    with pytest.raises(ValueError, match="needs judge="):
        reward.vlm_reward([Image.new("RGB", (8, 8))], _layers(2), 2)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("criteria", "stage1", "stage2"):
        (prompts / f"{name}.txt").write_text((reward.PROMPTS_DIR / f"{name}.txt").read_text())
    (prompts / "stage2.txt").write_text("Score {candidates}: {answer_format}")
    with pytest.raises(ValueError, match=r"stage2.txt: placeholders"):
        reward.load_prompts(prompts)


# ----------------------------------------------------------------------------- evaluate
torch.set_num_threads(1)  # toy-sized ops: a second thread only adds OpenMP spin-waits (bench.py, --threads)


def layer(H, W, color=(0, 0, 0), alpha=0.0, box=None):
    """(4, H, W): `color` with `alpha` inside box = (top, left, bottom, right) (everywhere when None), (0,0,0,0) else."""
    x = torch.zeros(4, H, W)
    t, l, b, r = box or (0, 0, H, W)
    x[:3, t:b, l:r] = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
    x[3, t:b, l:r] = alpha
    return x


WHITE = layer(10, 10, (1, 1, 1), 1.0)
RED_SQ = layer(10, 10, (1, 0, 0), 1.0, (1, 1, 5, 5))  # 16 px
RED_SHIFTED = layer(10, 10, (1, 0, 0), 1.0, (1, 3, 5, 7))  # same square, 2 px to the right; 8 px overlap
GREEN_SQ = layer(10, 10, (0, 1, 0), 1.0, (5, 5, 10, 10))  # 25 px, disjoint from RED_SQ


def test_red_square_shifted_by_hand():
    ref = torch.stack([WHITE, RED_SQ])
    image = ev.composite(ref)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SHIFTED])
    # 16 px differ (8 + 8 of the symmetric difference); over white each is |(1,0,0)-(1,1,1)| = 2/3 per channel-mean
    assert m["per_layer_l1"] == pytest.approx([0.0, 16 * (2 / 3) / 100])
    assert m["per_layer_alpha_l1"] == pytest.approx([0.0, 16 / 100])
    assert m["mean_l1"] == pytest.approx(16 * (2 / 3) / 100 / 2)
    assert m["recon_l1"] == pytest.approx(16 * (2 / 3) / 100)
    assert (m["missing_layers"], m["extra_layers"], m["resized"]) == (0, 0, False)
    # LayerD: identity matching; red square: 8 of 16 ref pixels see transparent black, |(0,0,0)-(1,0,0)| = 1/3;
    # soft IoU = 8 / 24; two layers a side cannot be merged
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 8 * (1 / 3) / 16) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 8 / 24) / 2)
    assert m["layerd_edits"] == 0
    same = ev.sample_metrics(ref, image, [WHITE, RED_SQ])
    assert same["mean_l1"] == 0 and same["recon_l1"] == 0 and same["layerd_alpha_iou"] == 1


def test_transparent_vs_opaque_by_hand():
    blue = layer(10, 10, (0, 0, 1), 1.0)
    ref = torch.stack([WHITE, blue])
    m = ev.sample_metrics(ref, ev.composite(ref), [WHITE, layer(10, 10)])
    # over white: (1,1,1) against (0,0,1) -> 2/3 everywhere; alpha 0 against 1
    assert m["per_layer_l1"] == pytest.approx([0.0, 2 / 3])
    assert m["per_layer_alpha_l1"] == pytest.approx([0.0, 1.0])
    assert m["recon_l1"] == pytest.approx(2 / 3)
    # LayerD groups the empty layer (it touches nothing) with the white one; that one group is aligned with both
    # reference layers: white vs white 0, white vs blue 2/3 on every pixel; IoU 1 and 1
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 2 / 3) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx(1.0)
    # the other way round: the reference layer is empty, the prediction opaque
    m2 = ev.sample_metrics(torch.stack([WHITE, layer(10, 10)]), WHITE, [WHITE, blue])
    assert m2["per_layer_l1"] == pytest.approx([0.0, 2 / 3])
    assert m2["layerd_rgb_l1"] == pytest.approx((0 + 2 / 3) / 2)  # both pred layers against the one ref group
    assert m2["layerd_alpha_iou"] == pytest.approx(1.0)


def test_missing_and_extra_layers_by_hand():
    ref = torch.stack([WHITE, RED_SQ, GREEN_SQ])
    image = ev.composite(ref)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SQ])  # the green layer is missing -> fully transparent
    assert m["per_layer_l1"] == pytest.approx([0, 0, 25 * (2 / 3) / 100])  # white vs (0,1,0): (1,0,1) -> 2/3
    assert m["per_layer_alpha_l1"] == pytest.approx([0, 0, 0.25])
    assert (m["missing_layers"], m["extra_layers"]) == (1, 0)
    assert m["recon_l1"] == pytest.approx(25 * (2 / 3) / 100)
    # LayerD groups ref red+green (they do not overlap): rgb over 41 px, 25 of them transparent black vs green (1/3);
    # IoU 16/41; no edit (two layers a side)
    assert m["layerd_edits"] == 0
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 25 * (1 / 3) / 41) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 16 / 41) / 2)

    blue = layer(10, 10, (0, 0, 1), 1.0)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SQ, GREEN_SQ, blue])  # an extra opaque blue layer on top
    assert m["per_layer_l1"] == pytest.approx([0, 0, 0])  # extras are ignored per layer ...
    assert (m["missing_layers"], m["extra_layers"]) == (0, 1)
    assert m["recon_l1"] == pytest.approx(2 / 3)  # ... but hide everything in the reconstruction (all-blue image)
    # LayerD groups red+green on each side; the opaque blue is aligned with red+green too: rgb 2/3 on their 41 px,
    # IoU 41/100; merging it gains nothing
    assert m["layerd_edits"] == 0
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 0 + 2 / 3) / 3)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 1 + 0.41) / 3)
    empty = ev.sample_metrics(ref, image, [])
    assert empty["missing_layers"] == 3 and empty["layerd_rgb_l1"] is None
    assert empty["recon_l1"] == pytest.approx((16 * 2 / 3 + 25 * 2 / 3) / 100)


def test_resize_is_bilinear_on_premultiplied_rgba():
    # reference 8x8: left half opaque red, right half transparent; prediction the same at 16x16, its transparent
    # half coloured green (invisible, but straight-alpha resizing would bleed it into the red edge)
    ref = layer(8, 8, (1, 0, 0), 1.0, (0, 0, 8, 4))
    pred = layer(16, 16, (0, 1, 0), 0.0)
    pred[:, :, :8] = layer(16, 16, (1, 0, 0), 1.0)[:, :, :8]
    out = ev.resize_rgba(pred, (8, 8))
    # antialiased bilinear, factor 2: weights (1/8, 3/8, 3/8, 1/8) -> alpha 1, 1, 1, 7/8, 1/8, 0, 0, 0 per row
    assert out[3, 0].tolist() == pytest.approx([1, 1, 1, 7 / 8, 1 / 8, 0, 0, 0])
    assert torch.allclose(out[:3, :, :5], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 5))  # pure red
    m = ev.sample_metrics(ref[None], ev.composite(ref[None]), [pred])
    # columns 3 and 4 over white: (1, 1/8, 1/8) vs red and (1, 7/8, 7/8) vs white -> 1/12 each; 16 px of 64
    assert m["resized"] and m["per_layer_l1"] == pytest.approx([16 * (1 / 12) / 64])


def _copy_sample(src, dst, drop_last=False, extra=False, scale=1):
    dst.mkdir(parents=True)
    files = sorted(src.glob("layer_*.png"))
    for p in files[:-1] if drop_last else files:
        im = Image.open(p)
        im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(dst / p.name)
    if extra:
        Image.new("RGBA", Image.open(files[0]).size, (0, 0, 255, 255)).save(dst / f"layer_{len(files)}.png")


def test_grouping_counts_outputs_and_json(tmp_path, capsys):
    refs = tmp_path / "refs"
    data.write_references(refs, 6, seed=3, size=(40, 32), layer_counts=(2, 3, 4))
    names = sorted(p.name for p in refs.iterdir())
    for k, name in enumerate(names):  # run "copy": the references themselves; run "edited": k-dependent edits
        _copy_sample(refs / name, tmp_path / "copy" / name)
        _copy_sample(refs / name, tmp_path / "edited" / name, drop_last=k in (0, 3), extra=k == 1, scale=1 + (k == 2))
    ev.main(["--references", str(refs), "--predictions", str(tmp_path / "copy"), "--predictions",
             f"mine={tmp_path / 'edited'}", "--output_dir", str(tmp_path / "out")])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(res) == ["copy", "mine"] and all(list(r) == ["2", "3", "4"] for r in res.values())
    for run in res.values():
        for L, s in run.items():
            assert s["n"] == 2 and len(s["per_layer_l1"]) == int(L) == len(s["per_layer_alpha_l1"])
            assert {"mean_l1", "recon_l1", "missing_layers", "extra_layers", "layerd_rgb_l1",
                    "layerd_alpha_iou"} <= set(s)
            assert s["mean_l1"] == pytest.approx(np.mean(s["per_layer_l1"]))
    assert all(s["mean_l1"] == 0 and s["recon_l1"] < 1 / 255 for s in res["copy"].values())
    # L of sample k is (2, 3, 4)[k % 3]: drops on k=0 (L=2) and k=3 (L=2), extra on k=1 (L=3), 2x size on k=2 (L=4)
    mine = res["mine"]
    assert (mine["2"]["missing_layers"], mine["3"]["extra_layers"], mine["4"]["samples_resized"]) == (2, 1, 1)
    assert mine["2"]["per_layer_l1"][0] == 0 and mine["2"]["per_layer_l1"][1] > 0
    assert mine["3"]["per_layer_l1"] == [0, 0, 0] and mine["3"]["recon_l1"] > 0.1  # the opaque blue extra
    assert 0 < mine["4"]["mean_l1"] < 0.05  # nearest 2x upscale, resized back
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_sample.csv")))
    assert len(rows) == 12 and {r["run"] for r in rows} == {"copy", "mine"}
    assert sum(int(r["missing_layers"]) for r in rows) == 2
    for L in (2, 3, 4):
        assert Image.open(tmp_path / "out" / f"bars_L{L}.png").width > 200
    assert Image.open(tmp_path / "out" / "samples.png").height >= 4 * 3 * 128  # 4 samples x (ref + 2 runs)
    table = capsys.readouterr().out
    assert "L=2 (n=2)" in table and "Pred 3" in table and "mine" in table


def test_synthetic_generator(tmp_path):
    a = data.write_references(tmp_path / "a", 6, seed=7, size=(48, 40))
    data.write_references(tmp_path / "b", 3, seed=7, size=(48, 40))
    Ls = [len(list((tmp_path / "a" / p).glob("layer_*.png"))) for p in sorted(x.split("/")[-1] for x in a)]
    assert Ls == [2, 3, 4, 2, 3, 4]  # balanced mix
    for k in range(3):  # same seed, same sample, whatever num_samples
        assert (tmp_path / "a" / f"synth_{k:04d}" / "image.png").read_bytes() == \
               (tmp_path / "b" / f"synth_{k:04d}" / "image.png").read_bytes()
    img, layers = data.make_design(random.Random(0), 4, (48, 40))
    stack = torch.stack([data.pil_to_rgba(x) for x in layers])
    assert img.mode == "RGB" and img.size == (48, 40) and stack.shape == (4, 4, 40, 48)
    assert (stack[0, 3] == 1).all()  # opaque background
    assert all(0 < (s[3] > 0).float().mean() < 1 for s in stack[1:])  # every foreground layer partly visible
    recon = data.over_white(data.composite(stack))
    assert (recon - data.pil_to_rgba(img)[:3]).abs().max() <= 0.5 / 255 + 1e-6
    other, _ = data.make_design(random.Random(1), 4, (48, 40))
    assert np.abs(np.asarray(img, float) - np.asarray(other, float)).mean() > 5
    data.main(["synthetic", str(tmp_path / "imgs"), "--num_samples", "3", "--size", "48x40", "--seed", "7",
               "--images_only"])
    files = sorted((tmp_path / "imgs").iterdir())
    assert [f.name for f in files] == ["synth_0000.png", "synth_0001.png", "synth_0002.png"]
    assert files[1].read_bytes() == (tmp_path / "a" / "synth_0001" / "image.png").read_bytes()


def _element(color, left, top, width, height, angle=0.0, opacity=1.0):
    return {"image": Image.new("RGBA", (width, height), color + (255,)), "left": left, "top": top, "width": width,
            "height": height, "angle": angle, "opacity": opacity}


def test_crello_elements_to_layers():
    els = [_element((0, 0, 255), 0, 0, 40, 30),
           _element((255, 0, 0), 2, 2, 5, 5), _element((0, 255, 0), 10, 2, 5, 5),  # group 1
           _element((255, 255, 0), 20, 2, 5, 5, opacity=0.5), _element((0, 0, 0), -3, 20, 6, 4),  # group 2
           _element((255, 0, 255), 25, 15, 10, 4, angle=math.pi / 2)]  # group 3, rotated a quarter turn
    layers = data.elements_to_layers(els, (40, 30), max_layers=4)
    a = [np.asarray(x)[..., 3] for x in layers]
    assert len(layers) == 4 and all(x.size == (40, 30) for x in layers)
    assert (a[0] == 255).all() and (np.asarray(layers[0])[..., :3] == (0, 0, 255)).all()
    assert (a[1] > 0).sum() == 50 and a[1][2:7, 2:7].min() == 255 and a[1][2:7, 10:15].min() == 255
    assert (a[2] > 0).sum() == 25 + 3 * 4  # the half-transparent square and the part of the black box on the canvas
    assert a[2][2:7, 20:25].max() in (127, 128) and (a[2][20:24, 0:3] == 255).all()
    ys, xs = np.nonzero(a[3])  # 10x4 turned upright: 4 wide, 10 tall, about the same centre (30, 17)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (4, 10)
    assert abs(xs.mean() - 29.5) <= 0.5 and abs(ys.mean() - 16.5) <= 0.5
    assert len(data.elements_to_layers(els[:2], (40, 30))) == 2
    two = data.elements_to_layers(els, (40, 30), max_layers=2)  # all five foreground elements merged into one layer
    assert len(two) == 2 and (np.asarray(two[1])[..., 3] > 0).sum() == 50 + 25 + 12 + 40


def test_evaluate_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--references", str(tmp_path / "nope"), "--predictions", str(tmp_path)])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    data.write_references(tmp_path / "refs", 2, seed=0, size=(32, 32))
    (tmp_path / "preds" / "synth_0000").mkdir(parents=True)
    with pytest.raises(SystemExit):
        ev.main(["--references", str(tmp_path / "refs"), "--predictions", str(tmp_path / "preds")])
    assert "synth_0001" in capsys.readouterr().err
    (tmp_path / "preds" / "synth_0001").mkdir()
    shutil.copy(tmp_path / "refs" / "synth_0001" / "layer_0.png", tmp_path / "preds" / "synth_0001" / "layer_2.png")
    with pytest.raises(SystemExit):
        ev.main(["--references", str(tmp_path / "refs"), "--predictions", str(tmp_path / "preds"),
                 "--output_dir", str(tmp_path / "out")])
    assert "without gaps" in capsys.readouterr().err
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            data.main(["crello", str(tmp_path / "crello")])
        assert "pip install datasets" in capsys.readouterr().err


def test_model_mode_base_and_lora_in_each_format(tmp_path):
    rollout = pytest.importorskip("rollout")
    from diffusers import QwenImageLayeredPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    refs = tmp_path / "refs"
    data.write_references(refs, 2, seed=0, size=(64, 64), layer_counts=(2, 3))
    # one set of LoRA weights, written by peft itself (PEFT folder) and by diffusers (pytorch_lora_weights, with
    # lora_alpha in its metadata); lora_alpha != r, so a loader that drops alpha would give different layers
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v",
                                                                                         "to_out.0"])
    model = get_peft_model(tiny.tiny_pipeline().transformer, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # "gaussian" only draws lora_A; B starts at 0, which would leave outputs unchanged
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "peft_lora")
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    QwenImageLayeredPipeline.save_lora_weights(tmp_path / "diffusers_lora", transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata=config.to_dict())

    out = tmp_path / "out"
    ev.main(["--references", str(refs), "--pretrained_model_name_or_path", "tiny", "--device", "cpu", "--base",
             "--lora", f"diffusers={tmp_path / 'diffusers_lora' / 'pytorch_lora_weights.safetensors'}",
             "--lora", f"peft={tmp_path / 'peft_lora'}", "--resolution", "64", "--num_inference_steps", "2",
             "--output_dir", str(out)])
    pred = {run: {s: np.stack([np.asarray(Image.open(out / "predictions" / run / s / f"layer_{i}.png"))
                               for i in range(L)]) for s, L in (("synth_0000", 2), ("synth_0001", 3))}
            for run in ("base", "diffusers", "peft")}
    for s in ("synth_0000", "synth_0001"):
        assert pred["base"][s].shape[1:] == (64, 64, 4)
        assert np.abs(pred["diffusers"][s].astype(int) - pred["base"][s]).mean() > 1  # the LoRA changes layers
        assert (pred["diffusers"][s] == pred["peft"][s]).all()  # the two formats are the same weights
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["base", "diffusers", "peft"] and res["diffusers"] == res["peft"] != res["base"]
    assert res["base"]["3"]["n"] == 1 and res["base"]["3"]["missing_layers"] == 0
    meta = json.loads((out / "predictions" / "peft" / "meta.json").read_text())
    assert meta["sampler"] == "heun" and len(meta["seconds_per_sample"]) == 2
    assert (meta["dtype"], meta["mixed_precision"]) == ("float32", "no")  # the CPU ran float32, whatever was asked
    # the saved predictions re-score to the same numbers without the model
    again = ev.evaluate(refs, {"base": out / "predictions" / "base"}, tmp_path / "again")
    assert again["base"] == res["base"]


def test_crello_example_fractions_and_pixels_agree():
    els = [_element((0, 0, 255), 0, 0, 40, 30), _element((255, 0, 0), 4, 6, 8, 6, opacity=0.8)]
    pixels = {k: [e[k] for e in els] for k in ("image", "left", "top", "width", "height", "angle", "opacity")}
    frac = dict(pixels, left=[0, 4 / 40], top=[0, 6 / 30], width=[1, 8 / 40], height=[1, 6 / 30])
    pixels["image"] = pixels["image"] + [None]  # an element without an image is skipped
    for key in ("left", "top", "width", "height", "angle", "opacity"):
        pixels[key] = pixels[key] + [0.0]
    a, size_a = data.crello_elements(pixels, 40, 30, longest_side=80)
    b, size_b = data.crello_elements(frac, 40, 30, longest_side=80)
    assert size_a == size_b == (80, 60) and len(a) == len(b) == 2
    la, lb = data.elements_to_layers(a, size_a), data.elements_to_layers(b, size_b)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(la, lb))
    alpha = np.asarray(la[1])[..., 3]
    assert (alpha > 0).sum() == 16 * 12 and alpha.max() == 204  # 8x6 box scaled 2x, opacity 0.8 * 255


# ----------------------------------------------------------------------------- bench
def test_bench_cpu_toy_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--size", "toy", "--resolution", "32", "--layers", "1", "--group_size", "2",
                      "--train_batch_size", "1", "--num_inference_steps", "3", "--warmup", "0", "--repeats", "1",
                      "--json", str(path)])
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
    assert ratios["rollout ours / diffusers"] == pytest.approx(rows["rollout_ours"]["seconds"]
                                                               / rows["rollout_diffusers"]["seconds"])
    assert ratios["train with KL / without KL"] == pytest.approx(rows["train_kl"]["seconds"]
                                                                 / rows["train_no_kl"]["seconds"])
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
    res = bench.main(["--loop", "--device", "cpu", "--num_blocks", "1", "--resolution", "32", "--layers", "1",
                      "--group_size", "2", "--train_batch_size", "2", "--num_inference_steps", "3", "--sde_window", "1",
                      "--beta", "0", "--rank", "4", "--lora_alpha", "8"])
    assert res["model"] == "random:1" and res["steps"] == [1, 2] and res["checkpoints_written"] == 2
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
    kwargs = dict(hidden_states=torch.randn(batch, n_noise + h * h, cfg.in_channels),
                  timestep=torch.full((batch,), 0.5),
                  encoder_hidden_states=torch.randn(batch, n_txt, cfg.joint_attention_dim),
                  img_shapes=[[(1, h, h)] * (layers + 1) + [(1, h, h)]] * batch,
                  additional_t_cond=torch.zeros(batch, dtype=torch.long), return_dict=False)

    def count(grad=False):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = transformer(**kwargs)[0]
            if grad:
                out.square().mean().backward()
        return counter.get_total_flops()

    def formula(r):
        return bench.transformer_flops(cfg, n_noise + h * h, n_txt, cfg.num_layers, r)

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


# ----------------------------------------------------------------------------- the front door
def _documented_commands():
    """(file, script, argv) of every `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...` line in the README's and
    docs/'s bash blocks, with line continuations joined."""
    import importlib
    import shlex

    found = []
    for path in [Path(__file__).with_name("README.md"), *sorted(Path(__file__).with_name("docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = "" if line.lstrip().startswith("#") else line.split("&&")[-1].split(" #")[0].strip()
                words = shlex.split(line) if line else []
                scripts = [i for i, w in enumerate(words) if re.fullmatch(r"\w+\.py", w)]
                if scripts and (words[0] in ("python", "torchrun") or "=" in words[0]) and words[1:2] != ["-m"]:
                    i = scripts[0]
                    found.append((path.name, importlib.import_module(words[i][:-3]), words[i + 1:]))
    return found


def test_documented_commands_parse():
    """The commands the README and docs/ show (dry runs, the real runs, each script's examples) are accepted by
    the scripts' own parse_args, so the front door cannot drift from the code."""
    commands = _documented_commands()
    assert {m.__name__ for _, m, _ in commands} >= {"train", "rollout", "reward", "data", "evaluate"}
    for name, module, argv in commands:
        try:
            module.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{name}: python {module.__name__}.py {' '.join(argv)} does not parse") from e
