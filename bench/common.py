"""What every bench measurement shares: building the model at full or toy size, a trajectory laid out as rollout.py
makes one, the FLOP count, timing, and results written as they come.

FLOP (2 per multiply-add) per sample; K blocks, hidden D = heads * head_dim, N = N_img + N_txt tokens (noise +
condition + text), r = LoRA rank. One forward F = L + A + R + O:
    L = K 24 D^2 N       q, k, v, out (4 D^2) + MLP D->4D->D (8 D^2); each token through its own stream's weights
    A = K 4 N^2 D        Q K^T and A V over the joint sequence
    R = 2 r (18 K D N - 14 D N_txt)   LoRA, r (in + out) per adapted linear (none on the last block's text path)
    O = 2 D (64 + 64) N_img + 2 D J N_txt + 24 K D^2 + 2 (256 D + D^2) + 4 D^2    in/out projections (J = 3584),
                         and per sample: modulation, time MLP, output norm
  rollout step of G candidates: G F (R = 0 without LoRA); the sampler's elementwise arithmetic is not counted.
  training micro-step of B candidates: B [F + (L + A + R + 24 K D^2) + backward]: forward, recompute of the
    checkpointed blocks, and backward = L + 2A + 2R + 2 D 64 N_img - 6 D (D + r) N - 18 D^2 N_txt. Not "2 x
    forward": the base weights are frozen, so their weight-gradient matmuls never run (input gradients only,
    1 x L); attention and LoRA take 2 x; block 0's q, k, v need no input gradient (their input comes from frozen
    layers) and the last block's text output path gets none. With the KL add B (F - R): the reference forward.
  Full size, 640 px, 4 layers, N = 8000 + 1600 + 11 = 9611: F = 1.99e14 (L 66%, A 34%; + R 2% with LoRA r 64),
  a training micro-step 6.80e14 per sample, 8.79e14 with the KL. tests/test_bench.py checks this against
  torch.utils.flop_counter on the tiny model.
Scaling from K built blocks to 60: FLOP and time x FLOP(60) / FLOP(K) (about 60 / K); peak memory + (60 - K) x
the bytes one block keeps resident in that row: its weights (bf16 + LoRA fp32), AdamW's two moments of its
LoRA (once the first update has run), and while training its LoRA gradients plus its input saved by gradient
checkpointing, B N D 2 bytes. Transient activations (one block at a time) are not scaled.
"""

import json
import os
import shutil
import statistics
import sysconfig
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import rollout
from support import quantize, tiny

with quantize.quiet_imports():
    from diffusers import FlowMatchEulerDiscreteScheduler

PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312)]  # bf16 dense
STEP = 1  # the schedule step that is timed (the cost does not depend on it)


# ----------------------------------------------------------------------------- building
def build_pipeline(args, device, dtype, kind=None):
    """(pipeline with no text encoder, blocks built, blocks of the model measured); its blocks quantized by
    `kind` (default --quantize)."""
    torch.manual_seed(args.seed)
    if args.size == "toy":
        pipe = tiny.tiny_pipeline(args.seed)
        pipe.text_encoder = None  # prompt embeddings are random below; the encoder is not part of a step
        if device != "cpu" or dtype != torch.float32:
            pipe.to(device, dtype)
        return pipe, len(pipe.transformer.transformer_blocks), len(pipe.transformer.transformer_blocks)
    blocks, full = args.num_blocks or tiny.FULL_TRANSFORMER["num_layers"], tiny.FULL_TRANSFORMER["num_layers"]
    pipe = tiny.released_pipeline(blocks, device, dtype, seed=args.seed)
    pipe.text_encoder = None  # as above: prompt embeddings are random, the encoder is not part of a step
    quantize.quantize_blocks(pipe.transformer, kind or args.quantize)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return pipe, blocks, full


def set_schedule(scheduler, args, device):
    """rollout._start's schedule: T linear sigmas shifted with mu = sqrt(S_c / 256) = resolution / 256."""
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 0, args.num_inference_steps + 1)[:-1], mu=args.resolution / 256, device=device
    )
    return scheduler


def make_trajectory(pipe, args, device, dtype):
    """A rollout.Trajectory laid out as rollout._start makes it, with random condition latents and prompt
    embeddings (the text encoder and the VAE encoder run once per image, not per step). Returns (traj, x_t)."""
    cfg, G, h = pipe.transformer.config, args.group_size, args.resolution // 16
    scheduler = set_schedule(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), args, device)
    g = torch.Generator(device).manual_seed(args.seed)
    traj = rollout.Trajectory(
        latents=None,
        log_probs=None,
        window=(STEP, STEP + 1),
        sigmas=scheduler.sigmas,
        timesteps=scheduler.timesteps,
        image_latents=torch.randn(G, h * h, cfg.in_channels, generator=g, device=device).to(dtype),  # (G, S_c, 64)
        prompt_embeds=torch.randn(G, args.text_tokens, cfg.joint_attention_dim, generator=g, device=device).to(dtype),
        prompt_embeds_mask=None,
        negative_prompt_embeds=None,
        negative_prompt_embeds_mask=None,
        layers=None,
        images=[],
        num_layers=args.layers,
        height=args.resolution,
        width=args.resolution,
        group_size=G,
        noise_level=args.noise_level,
        true_cfg_scale=1.0,
        cfg_normalize=False,
        sde_type="sde",
    )
    return traj, torch.randn(G, (args.layers + 1) * h * h, cfg.in_channels, generator=g, device=device)  # (G, S, 64)


# ----------------------------------------------------------------------------- counting
def transformer_flops(cfg, n_img, n_txt, blocks, rank=0):
    """Per-sample FLOP, formulas (L, A, R, O) in the module docstring: dict(forward, train, train_kl)."""
    D, N = cfg.num_attention_heads * cfg.attention_head_dim, n_img + n_txt
    c_out = cfg.patch_size**2 * cfg.out_channels
    lin, attn = blocks * 24 * D * D * N, blocks * 4 * N * N * D  # L, A
    adapter = 2 * rank * (18 * blocks * D * N - 14 * D * n_txt) if rank else 0  # R
    other = (
        2 * D * (cfg.in_channels + c_out) * n_img
        + 2 * D * cfg.joint_attention_dim * n_txt  # O
        + 24 * blocks * D * D
        + 2 * (256 * D + D * D)
        + 4 * D * D
    )
    forward = lin + attn + adapter + other
    backward = lin + 2 * attn + 2 * adapter + 2 * D * c_out * n_img - 6 * D * (D + rank) * N - 18 * D * D * n_txt
    train_ = forward + (lin + attn + adapter + 24 * blocks * D * D) + backward
    return {"forward": forward, "train": train_, "train_kl": train_ + forward - adapter}


def block_bytes(transformer):
    """(parameter bytes as stored, quantized ones too; trainable (LoRA) parameter bytes) of block 0."""
    block = transformer.transformer_blocks[0]
    trainable = sum(p.numel() * p.element_size() for p in block.parameters() if p.requires_grad)
    return quantize.weight_bytes(block), trainable


def measure(fn, device, warmup, repeats, setup=None):
    """Median wall seconds of fn() over `repeats` calls after `warmup` calls (setup() untimed before each), and
    on CUDA the peak GiB allocated and reserved by torch during the timed calls (all resident memory included)."""
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        setup and setup()
        fn()
    if cuda:
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        setup and setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    gib = [torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30] if cuda else [None] * 2
    return statistics.median(times), *gib


# ----------------------------------------------------------------------------- results as they come
def write_json(path, res):
    """res to `path` now, whole: written beside it and renamed over it, so the file is valid JSON at any moment and a
    run killed later (a timeout) leaves every row measured before."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_text(json.dumps(res, indent=2))
        part.replace(path)


def failure(error):
    """A row whose configuration raised: out of GPU memory is an answer ("does not fit"); anything else is recorded in
    one line and its traceback printed, and the benchmark goes on with the next row."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return {"oom": True}
    traceback.print_exception(error)
    return {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"}


def compiler_missing(device):
    """What torch.compile needs and this machine lacks, '' if nothing: a C compiler (Triton builds each kernel's
    launcher with it on CUDA; inductor's C++ kernels need a C++ one on the CPU) and Python.h, which both include."""
    cuda = device.startswith("cuda")
    names = [os.environ.get("CC"), "gcc", "clang", "cc"] if cuda else [os.environ.get("CXX"), "g++", "clang++", "c++"]
    missing = (
        [] if any(n and shutil.which(n) for n in names) else [f"a {'C' if cuda else 'C++'} compiler ({names[1]})"]
    )
    header = Path(sysconfig.get_paths()["include"], "Python.h")
    return " and ".join(missing + ([] if header.exists() else [f"{header} (python3-dev)"]))


def fmt(value, spec):
    return "-" if value is None else format(value, spec)
