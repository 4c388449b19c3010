"""Speed and memory of Stable-Layers' hot paths: a rollout step, a VAE decode, a training micro-step.

Random weights, no download: the transformer is built from the public Qwen-Image-Layered configuration (60
blocks, 20.4B parameters, 38 GiB bf16) directly on the GPU in bf16 (tiny.released_pipeline, which train.py, sft.py
and evaluate.py load as --pretrained_model_name_or_path random), or K of its blocks at full width (--num_blocks K)
with the figures scaled to 60. On a CPU the default is tiny.tiny_pipeline (seconds).
Everything timed is the project's own code: rollout.predict_velocity + rollout.sde_step_with_logprob (a
rollout step), rollout.decode_layers, train.policy_update (rollout.step_log_prob + grpo.policy_loss, + the
KL with lora.reference_policy, backward with gradient checkpointing, grad clip, AdamW) on lora.add_lora's
LoRA; beside it the loop body of diffusers' QwenImageLayeredPipeline (transformer + scheduler.step).

    python bench.py                                                 # CPU, toy size, ~10 s
    python bench.py --device cuda --json outputs/bench-gpu.json     # one H100/H200: full size, all 60 blocks
    python bench.py --device cuda --judge_gib 18                    # ... with 18 GiB held for a judge
    python bench.py --device cuda --num_blocks 8                    # a smaller GPU: 8 blocks, scaled to 60
    python bench.py --ratio --mixed_precision bf16 --group_size 8   # on-policy ratio - 1: batch G vs micro-batches
    python bench.py --overlap 0.8                                   # judge latency hidden behind rollouts?
    python bench.py --overlap 0.8 --resolution 128                  # ... when a group's torch work > client work
    python bench.py --scaling                                       # images/s of train.py, 1 vs 2 gloo ranks (CPU)
    python bench.py --levers --device cuda                          # speed levers against eager, in one run
    python bench.py --levers eager --device cuda                    # ... its eager half; --levers compiled the other
    python bench.py --device cuda --quantize int8                   # the table on the int8 base (48 GB class)
    python bench.py --device cuda --quantize int8 --card_gib 44.99  # ... as on a 48 GB L40S: the rest held away
    python bench.py --quant_error --num_blocks 2 --resolution 128   # --quantize's velocity error, CPU
    python bench.py --loop --device cuda                            # train.py's whole loop at full size: 2 steps
                                                                    # with a resume, time, memory, checkpoint
Every row is printed and written to --json as soon as it is measured (a run stopped by a timeout keeps the rows
before); a row that raises is recorded ("out of GPU memory" is an answer; another error prints its traceback, and
the run exits 1 at the end) and the next row runs.

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
  a training micro-step 6.80e14 per sample, 8.79e14 with the KL. test_bench.py checks this against
  torch.utils.flop_counter on the tiny model.
Scaling from K built blocks to 60: FLOP and time x FLOP(60) / FLOP(K) (about 60 / K); peak memory + (60 - K) x
the bytes one block keeps resident in that row: its weights (bf16 + LoRA fp32), AdamW's two moments of its
LoRA (once the first update has run), and while training its LoRA gradients plus its input saved by gradient
checkpointing, B N D 2 bytes. Transient activations (one block at a time) are not scaled.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import data
import rollout
import lora
import quantize
import tiny
import train

# --levers' configurations by set: eager or compiled (--compile), "attention" --attention_backend (else SDPA's own
# kernel choice), "micro-batch" twice --train_batch_size; eager ones first (compiling cannot be undone)
LEVER_SETS = {
    "all": [
        "eager",
        "eager, attention",
        "eager, micro-batch",
        "compiled",
        "compiled, attention",
        "compiled, attention, micro-batch",
    ],
    "eager": ["eager", "eager, attention", "eager, micro-batch"],
    "compiled": ["eager", "compiled", "compiled, attention"],
}
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312)]  # bf16 dense
STEP = 1  # the schedule step that is timed (the cost does not depend on it)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time and peak memory of a rollout step, a decode and a training "
        "micro-step of Stable-Layers, on random weights; prints a table."
    )
    a = p.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a(
        "--size",
        choices=["toy", "full"],
        default=None,
        help="tiny pipeline or the real configuration (default: full on cuda, toy on cpu)",
    )
    a(
        "--num_blocks",
        type=int,
        default=None,
        help="full size: build K of the 60 blocks, scale the figures to 60 "
        "(K >= 2: a lone block is also the last one, which has 3 fewer LoRA modules)",
    )
    a("--mixed_precision", choices=["no", "bf16"], default=None, help="model dtype (default: bf16 on cuda, no on cpu)")
    a("--resolution", type=int, default=None, help="condition side in px (default: 640 full, 64 toy)")
    a("--layers", type=int, default=4, help="RGBA layers N: (N+1) (res/16)^2 noise tokens")
    a("--text_tokens", type=int, default=11, help="prompt tokens after the template drop (the fixed prompt has 11)")
    a("--group_size", type=int, default=None, help="G, candidates per rollout step (default: 8 full, 4 toy)")
    a("--train_batch_size", type=int, default=2, help="candidates per training forward/backward (train.py's flag)")
    a("--rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=int, default=128, help="LoRA alpha")
    a("--noise_level", type=float, default=1.2, help="SDE noise level a")
    a("--beta", type=float, default=0.04, help="KL weight of the with-KL training row")
    a("--num_inference_steps", type=int, default=10, help="T: the schedule, and the train-step estimate")
    a("--sde_window", type=int, default=2, help="trained steps per rollout, for the train-step estimate")
    a("--no_decode", action="store_true", help="skip the VAE decode row")
    a("--decode_chunk", type=int, default=8, help="VAE frames decoded at a time (train.py's flag)")
    a(
        "--quantize",
        default="none",
        choices=list(quantize.QUANTIZE),
        help="the transformer blocks quantized as "
        "train.py --quantize does (quantize.py); the table then measures the quantized base",
    )
    a(
        "--quant_error",
        action="store_true",
        help="instead of the table: the velocity of each --quantize kind against "
        "the model dtype's on the same inputs (released configuration, --num_blocks K at full width; CPU is enough)",
    )
    a(
        "--judge_gib",
        type=float,
        default=0.0,
        help="hold this many GiB on the GPU all along, as a judge on the same "
        "GPU would (Qwen3.5-9B bf16: 18); out of memory then answers 'does not fit'",
    )
    a(
        "--card_gib",
        type=float,
        default=None,
        help="the table as on a smaller card: once the model is built, all of "
        "the GPU's memory above this many GiB (the card's total as nvidia-smi gives it; docs/performance.md lists the "
        "classes') is held away, so a row that would not fit that card says so; its GiB figures leave the held memory out",
    )
    a("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    a("--repeats", type=int, default=3, help="timed calls; the median is reported")
    a("--peak_tflops", type=float, default=None, help="device bf16 dense peak (default: from the device name)")
    a(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 at toy size: its kernels are too small to "
        "gain and OpenMP spin-waits wreck timings on a busy machine; else torch's default)",
    )
    a("--seed", type=int, default=0, help="random seed")
    a("--json", default=None, help="also write the numbers to this JSON file (any mode)")
    a(
        "--overlap",
        type=float,
        default=None,
        metavar="D",
        help="instead of the table: train.py's step time on the tiny "
        "model (--resolution, default 64; --threads, default 1), 4 images per step, with a loopback HTTP judge "
        "answering after D seconds: serial, overlapped, and the lower bound",
    )
    a(
        "--scaling",
        action="store_true",
        help="instead of the table: images/s of train.py on the tiny model as 1 "
        "process and as torchrun --nproc_per_node 2 (CPU, gloo, one thread per rank), and their ratio",
    )
    a(
        "--ratio",
        action="store_true",
        help="instead of the table: the on-policy ratio's distance from 1 when the "
        "rollout runs batch G and re-scoring runs micro-batches of --train_batch_size (bf16 rounding differs)",
    )
    a(
        "--levers",
        nargs="?",
        const="all",
        default=None,
        choices=list(LEVER_SETS),
        help="instead of the table: the "
        "speed levers against eager in one run (--attention_backend, default _native_cudnn on cuda; --compile; twice "
        "--train_batch_size): rollout step, micro-step, one image's step, the on-policy ratio and the log-prob "
        "distance from eager under each. 'eager' or 'compiled' runs one half (each fits a lent GPU's part; "
        "'compiled' starts with eager, its reference)",
    )
    a(
        "--attention_backend",
        default=None,
        choices=rollout.ATTENTION_BACKENDS,
        help="--levers: the attention kernel to try (default _native_cudnn on cuda, _native_math on cpu)",
    )
    a(
        "--loop",
        action="store_true",
        help="instead of the table: train.py's whole loop on the released configuration "
        "with random weights (--pretrained_model_name_or_path random; --num_blocks K builds K blocks), one image per "
        "step, the vlm reward with the tiny judge: a step and its checkpoint, then a resumed second step; prints each "
        "step's time and peak memory and the checkpoint's size and write time",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("full" if cuda or args.loop or args.quant_error else "toy")
    args.resolution = args.resolution or (640 if args.size == "full" else 64)
    args.group_size = args.group_size or (8 if args.size == "full" else 4)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    checks = [
        (not cuda or torch.cuda.is_available(), "--device cuda: no GPU is visible"),
        (args.resolution > 0 and args.resolution % 32 == 0, "--resolution must be a positive multiple of 32"),
        (args.layers >= 1 and args.text_tokens >= 1, "--layers and --text_tokens must be >= 1"),
        (1 <= args.train_batch_size <= args.group_size, "--train_batch_size must be in 1..--group_size"),
        (
            args.num_blocks is None or (args.size == "full" and 1 <= args.num_blocks <= 60),
            "--num_blocks needs --size full and a value in 1..60",
        ),
        (args.num_inference_steps >= 3, "--num_inference_steps must be >= 3"),
        (args.judge_gib == 0 or cuda, "--judge_gib needs --device cuda"),
        (args.card_gib is None or (cuda and args.card_gib > 0), "--card_gib needs --device cuda and a value > 0"),
        (args.warmup >= 0 and args.repeats >= 1, "--warmup must be >= 0 and --repeats >= 1"),
        (not args.loop or args.size == "full", "--loop runs the released configuration: drop --size toy"),
        (args.decode_chunk >= 1, "--decode_chunk must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


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


# ----------------------------------------------------------------------------- the benchmark
def run(args):
    """Build, then time every row, print it and write --json as soon as it is measured; return the results (what
    --json holds at the end)."""
    device, dtype = args.device, rollout.DTYPES[args.mixed_precision]
    if args.threads or (device == "cpu" and args.size == "toy"):
        torch.set_num_threads(args.threads or 1)
    judge = torch.empty(int(args.judge_gib * 2**30), dtype=torch.uint8, device=device) if args.judge_gib else None
    pipe, blocks, total_blocks = build_pipeline(args, device, dtype)
    transformer, cfg = pipe.transformer, pipe.transformer.config
    traj, x = make_trajectory(pipe, args, device, dtype)
    card = hold_above(args.card_gib, device) if args.card_gib else None  # the built (quantized) model stays below
    held = card.numel() / 2**30 if card is not None else 0.0
    G, B, h, D = args.group_size, args.train_batch_size, args.resolution // 16, transformer.inner_dim
    n_noise, n_txt = (args.layers + 1) * h * h, args.text_tokens
    n_img = n_noise + h * h

    def flops(k, kind, rank=0):
        return transformer_flops(cfg, n_img, n_txt, k, rank)[kind]

    t, sigma, sigma_next = traj.timesteps[STEP], traj.sigmas[STEP], traj.sigmas[STEP + 1]
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if k in name), None)
    rows, out = {}, {}
    res = dict(
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        size=args.size,
        quantize=args.quantize,
        blocks_built=blocks,
        blocks_full=total_blocks,
        hidden=D,
        resolution=args.resolution,
        layers=args.layers,
        tokens=dict(noise=n_noise, condition=h * h, text=n_txt),
        group_size=G,
        train_batch_size=B,
        rank=args.rank,
        judge_gib=args.judge_gib,
        card_gib=args.card_gib,
        peak_tflops=peak_tflops,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        rows=rows,
        complete=False,
    )
    print("\n".join(table_head(res)), flush=True)

    def record(key, label, batch, fn, flop_of, resident_bytes, setup=None):
        """Time one row, print it, write --json; flop_of(k) is its FLOP with k blocks; resident_bytes is what one
        block keeps resident. A row that raises is recorded as such and the next one runs."""
        try:
            seconds, alloc, reserved = measure(fn, device, args.warmup, args.repeats, setup)
        except Exception as e:  # out of memory answers "does not fit"; any other error is this row's, not the run's
            rows[key] = dict(label=label, batch=batch, **failure(e))
        else:
            alloc, reserved = (alloc and alloc - held), (reserved and reserved - held)  # the run's own memory
            flop = flop_of(blocks) if flop_of else None
            factor = flop_of(total_blocks) / flop if flop_of else 1.0  # ~ total_blocks / blocks
            extra = (total_blocks - blocks) * resident_bytes / 2**30
            tflops = flop / seconds / 1e12 if flop else None
            rows[key] = dict(
                label=label,
                batch=batch,
                seconds=seconds * factor,
                flop=flop and flop * factor,
                tflops=tflops,
                pct_peak=100 * tflops / peak_tflops if tflops and peak_tflops else None,
                alloc_gib=alloc and alloc + extra,
                reserved_gib=reserved and reserved + extra,
                measured=dict(seconds=seconds, flop=flop, alloc_gib=alloc, reserved_gib=reserved),
                resident_bytes_per_block=resident_bytes,
            )
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # after a failure: what its frames held is free now
        print(table_row(rows[key], args.card_gib), flush=True)
        write_json(args.json, res)

    # 1-2. one rollout step of G candidates: ours, then diffusers' loop body (transformer + scheduler.step)
    weights, _ = block_bytes(transformer)
    generator = torch.Generator(device).manual_seed(args.seed)

    @torch.no_grad()
    def ours():
        v = rollout.predict_velocity(transformer, traj, x, t)  # (G, S, 64)
        out["step"] = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, args.noise_level, generator=generator)

    record(
        "rollout_ours",
        "rollout step, ours (predict_velocity+SDE)",
        G,
        ours,
        lambda k: G * flops(k, "forward"),
        weights,
        setup=transformer.eval,
    )
    scheduler, x_low, is_rgb = pipe.scheduler, x.to(dtype), torch.zeros(G, dtype=torch.long, device=device)

    @torch.no_grad()
    def diffusers_step():  # QwenImageLayeredPipeline.__call__'s loop body with CFG off; latents in the model dtype
        with transformer.cache_context("cond"):
            v = transformer(
                hidden_states=torch.cat([x_low, traj.image_latents], dim=1),
                guidance=None,
                timestep=t.expand(G).to(dtype) / 1000,
                encoder_hidden_states_mask=None,
                encoder_hidden_states=traj.prompt_embeds,
                img_shapes=traj.img_shapes(G),
                attention_kwargs={},
                additional_t_cond=is_rgb,
                return_dict=False,
            )[0][:, :n_noise]
        scheduler.step(v, t, x_low, return_dict=False)

    record(
        "rollout_diffusers",
        "rollout step, diffusers (transformer+Euler)",
        G,
        diffusers_step,
        lambda k: G * flops(k, "forward"),
        weights,
        setup=lambda: set_schedule(scheduler, args, device).set_begin_index(STEP),
    )
    if "step" not in out:
        raise RuntimeError(
            "the first rollout step did not run (its row says why); the rows after it need its output: "
            "try --num_blocks, --group_size, --judge_gib"
        )
    # 3. decode the G x N layers (VAE frames in chunks of 8), under the autocast that lora.lora_precision holds
    #    around rollout.sample in training (a bf16 model: the decode runs inside it)
    if not args.no_decode:
        final = out["step"][0]

        def decode():
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                return rollout.decode_layers(
                    pipe, final, args.resolution, args.resolution, args.layers, args.decode_chunk
                )

        record(
            "decode",
            f"decode G x {args.layers} layers (decode_layers, autocast)",
            G * args.layers,
            decode,
            None,
            weights,
        )
    # 4-5. one training micro-step, as train.py runs it: B candidates, one trained timestep
    prev_sample, log_prob = out.pop("step")[:2]
    tt = dataclasses.replace(
        traj,
        latents=torch.stack([x, prev_sample], 1)[:B],
        log_probs=log_prob[:B, None],
        image_latents=traj.image_latents[:B],
        prompt_embeds=traj.prompt_embeds[:B],
        group_size=B,
    )
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=1e-4)  # lr 0: the whole update runs, weights stay
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(args.seed))
    weights, lora_bytes = block_bytes(transformer)
    saved_input = B * (n_img + n_txt) * D * torch.finfo(dtype).bits // 8  # kept per block by gradient checkpointing

    def train_step(beta):
        targs = SimpleNamespace(train_batch_size=B, num_inner_epochs=1, clip_range=1e-4, beta=beta, max_grad_norm=1.0)

        def fn():
            transformer.train()
            with lora.lora_precision(transformer):  # as train.py runs it
                stats = train.policy_update(transformer, [tt], advantages, targs, params, optimizer)
            if stats["train/skipped_updates"]:
                raise RuntimeError("non-finite loss on these random weights, no backward ran; try another --seed")

        return fn

    for key, beta, kind in [("train_no_kl", 0.0, "train"), ("train_kl", args.beta, "train_kl")]:
        record(
            key,
            f"train micro-step, beta {beta:g}" + (" (+ref forward)" if beta else ""),
            B,
            train_step(beta),
            lambda k, kind=kind: B * flops(k, kind, args.rank),
            weights + 3 * lora_bytes + saved_input,
        )

    # 6. the rollout step again with the LoRA on: what train.py's rollouts run
    def ours_lora():
        with lora.lora_precision(transformer):  # as train.py's rollouts run
            ours()

    record(
        "rollout_lora",
        f"rollout step, ours, LoRA r {args.rank} on",
        G,
        ours_lora,
        lambda k: G * flops(k, "forward", args.rank),
        weights + 2 * lora_bytes,
        setup=transformer.eval,
    )
    del judge, card

    s = {k: v["measured"]["seconds"] for k, v in rows.items() if "measured" in v}

    def ratio(a, b):
        return s[a] / s[b] if a in s and b in s else None

    micro_steps, train_key = math.ceil(G / B) * args.sde_window, "train_kl" if args.beta > 0 else "train_no_kl"
    estimate = (
        (
            args.num_inference_steps * rows["rollout_lora"]["seconds"]
            + rows.get("decode", {}).get("seconds", 0)
            + micro_steps * rows[train_key]["seconds"]
        )
        if {"rollout_lora", train_key} <= set(s)
        else None
    )
    res.update(
        ratios={
            "rollout ours / diffusers": ratio("rollout_ours", "rollout_diffusers"),
            "rollout LoRA on / off": ratio("rollout_lora", "rollout_ours"),
            "train with KL / without KL": ratio("train_kl", "train_no_kl"),
        },
        train_step_estimate=dict(seconds=estimate, rollout_steps=args.num_inference_steps, micro_steps=micro_steps),
        complete=True,
    )
    print("\n".join(table_tail(res)), flush=True)
    return res


def hold_above(card_gib, device):
    """Hold (allocate, never touch) all of the GPU's memory above card_gib GiB, so the rest of the run has what a card
    of that size would have left with the same model on it: total - card_gib GiB, the model and the CUDA context
    counted in the part that stays. Returns the held tensor (free it to give the memory back), or None where this GPU
    is no larger than the card."""
    torch.cuda.empty_cache()  # what the build left cached counts as free: a card would have it
    free, total = torch.cuda.mem_get_info(device)
    hold = total - int(card_gib * 2**30)
    if hold <= 0:
        print(f"--card_gib {card_gib:g}: this GPU has {total / 2**30:.2f} GiB, no more than the card: nothing held")
        return None
    if hold > free:  # the weights and the context are already more than the card
        raise ValueError(
            f"--card_gib {card_gib:g}: the model built here and the CUDA context already take "
            f"{(total - free) / 2**30:.1f} GiB: it does not fit a {card_gib:g} GiB card at all"
        )
    return torch.empty(hold, dtype=torch.uint8, device=device)


def levers(args):
    """The speed levers against eager, in one run on one build (rollout.speed_up; train.py's flags): SDPA's own
    kernel choice or --attention_backend (default _native_cudnn on CUDA), eager or --compile, the update at
    --train_batch_size or twice it; --levers eager / compiled runs one half (LEVER_SETS). Compilation cannot be
    undone, so the eager configurations run first. Per configuration: the rollout step of G candidates with the LoRA
    on, the training micro-step (with the KL when --beta > 0), one image's step from them (T rollout steps +
    ceil(G/B) K micro-steps; the decode, no lever's business, left out), first_calls_s (the first rollout step,
    re-scoring and update of the configuration: where compiled, every graph's compile), peak GiB reserved, and two
    numbers that must not move: max |ratio - 1| of the rollout's log-probs (batch G, no grad) re-scored in
    micro-batches with gradients (the on-policy ratio under that configuration), and max |log p - log p eager| of
    the same transition. Each configuration's row is printed and written to --json as soon as it is measured; one
    that raises is recorded as such and the next one runs."""
    device, dtype = args.device, rollout.DTYPES[args.mixed_precision]
    cuda = device.startswith("cuda")
    if args.threads or (device == "cpu" and args.size == "toy"):
        torch.set_num_threads(args.threads or 1)
    pipe, blocks, total_blocks = build_pipeline(args, device, dtype)
    transformer, cfg = pipe.transformer, pipe.transformer.config
    traj, x = make_trajectory(pipe, args, device, dtype)
    G, B, h, T = args.group_size, args.train_batch_size, args.resolution // 16, args.num_inference_steps
    n_img, n_txt = (args.layers + 2) * h * h, args.text_tokens
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        for p in params:  # B = 0 would hide the adapter from the numbers
            p.normal_(0, 0.02, generator=g)
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=1e-4)  # lr 0: the whole update runs, weights stay
    t, sigma, sigma_next = traj.timesteps[STEP], traj.sigmas[STEP], traj.sigmas[STEP + 1]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if k in name), None)
    flop = transformer_flops(cfg, n_img, n_txt, blocks, args.rank)
    factor = transformer_flops(cfg, n_img, n_txt, total_blocks, args.rank)["forward"] / flop["forward"]
    kind = "train_kl" if args.beta > 0 else "train"
    backend = args.attention_backend or ("_native_cudnn" if cuda else "_native_math")
    configs = [
        (
            c.replace("attention", backend).replace("micro-batch", f"micro-batch {2 * B}"),
            backend if "attention" in c else None,
            c.startswith("compiled"),
            2 * B if "micro-batch" in c else B,
        )
        for c in LEVER_SETS[args.levers]
    ]
    configs = [c for c in configs if c[3] <= G]
    missing = compiler_missing(device)
    if missing and any(c[2] for c in configs):
        print(f"skipping the compiled configurations: torch.compile needs {missing}, which this machine lacks")
        configs = [c for c in configs if not c[2]]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, eager, compiled_yet = [], None, False
    res = dict(
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        blocks_built=blocks,
        blocks_full=total_blocks,
        resolution=args.resolution,
        layers=args.layers,
        group_size=G,
        rank=args.rank,
        beta=args.beta,
        peak_tflops=peak_tflops,
        levers=args.levers,
        rows=rows,
        complete=False,
    )
    print("\n".join(levers_head(res)), flush=True)
    for label, attention, compiled, batch in configs:
        try:
            if compiled and not compiled_yet:  # the first compiled configuration (the eager ones ran before)
                rollout.speed_up(transformer, compile=True)
                compiled_yet = True
            transformer.set_attention_backend(attention or "native")  # native: PyTorch's SDPA picks the kernel

            def rollout_step():
                transformer.eval()
                with torch.no_grad(), lora.lora_precision(transformer):
                    v = rollout.predict_velocity(transformer, traj, x, t)  # (G, S, 64)
                    return rollout.sde_step_with_logprob(
                        v,
                        x,
                        sigma,
                        sigma_next,
                        args.noise_level,
                        generator=torch.Generator(device).manual_seed(args.seed),
                    )

            t0 = time.perf_counter()  # first calls: where compiled, they compile every graph this configuration runs
            prev, old = rollout_step()[:2]
            full = dataclasses.replace(traj, latents=torch.stack([x, prev], 1), log_probs=old[:, None])
            micro = dataclasses.replace(
                full,
                latents=full.latents[:batch],
                log_probs=full.log_probs[:batch],
                image_latents=traj.image_latents[:batch],
                prompt_embeds=traj.prompt_embeds[:batch],
                group_size=batch,
            )
            targs = SimpleNamespace(
                train_batch_size=batch, num_inner_epochs=1, clip_range=1e-4, beta=args.beta, max_grad_norm=1.0
            )
            advantages = torch.randn(batch, generator=torch.Generator().manual_seed(args.seed))

            def update():
                transformer.train()
                with lora.lora_precision(transformer):
                    train.policy_update(transformer, [micro], advantages, targs, params, optimizer)

            transformer.train()  # the on-policy ratio: the rollout's log-probs re-scored in micro-batches, with grads
            with lora.lora_precision(transformer):
                new = torch.cat(
                    [
                        rollout.step_log_prob(transformer, full, 0, part)[0].detach()
                        for part in torch.arange(G).split(batch)
                    ]
                )
            update()
            sync()
            first = time.perf_counter() - t0
            eager = (
                eager or full
            )  # the first configuration's transition, scored by every configuration's rollout graph
            transformer.eval()
            with torch.no_grad(), lora.lora_precision(transformer):
                vs_eager = (rollout.step_log_prob(transformer, eager, 0)[0] - eager.log_probs[:, 0]).abs().max().item()
            roll_s, _, roll_gib = measure(rollout_step, device, args.warmup, args.repeats)
            train_s, _, train_gib = measure(update, device, args.warmup, args.repeats)
        except Exception as e:  # out of memory answers "does not fit"; any other error is this configuration's
            row = dict(label=label, batch=batch, **failure(e))
        else:
            tflops = batch * flop[kind] / train_s / 1e12
            row = dict(
                label=label,
                rollout_s=roll_s * factor,
                micro_step_s=train_s * factor,
                batch=batch,
                step_per_image_s=factor * (T * roll_s + math.ceil(G / batch) * args.sde_window * train_s),
                micro_step_pct_peak=100 * tflops / peak_tflops if peak_tflops else None,
                first_calls_s=first,
                reserved_gib=max(roll_gib or 0, train_gib or 0) or None,
                ratio_max_abs_minus_1=(torch.exp(new - old).double() - 1).abs().max().item(),
                log_prob_max_abs_vs_eager=vs_eager,
            )
            base = (
                row
                if label == "eager"
                else next((r for r in rows if r["label"] == "eager" and "rollout_s" in r), None)
            )
            row["speedup_per_image"] = base["step_per_image_s"] / row["step_per_image_s"] if base else None
        if cuda:
            torch.cuda.empty_cache()  # after a failure: what its frames held is free now
        rows.append(row)
        print(levers_row(row), flush=True)
        write_json(args.json, res)
    transformer.set_attention_backend("native")  # diffusers keeps the last choice process-wide
    res["complete"] = True
    return res


def levers_head(res):
    return [
        f"device {res['device']} | {res['dtype']} | {res['blocks_built']} of {res['blocks_full']} blocks built "
        f"(times scaled to {res['blocks_full']}) | {res['resolution']} px, {res['layers']} layers, G "
        f"{res['group_size']}, LoRA r {res['rank']}, beta {res['beta']:g}",
        "1st calls: the configuration's first rollout step, re-scoring and update (compiled: their compiles)",
        "",
        f"{'configuration':<40}{'rollout s':>10}{'micro s':>9}{'B':>3}{'image s':>9}{'x eager':>8}"
        f"{'% peak':>8}{'1st calls':>10}{'|r-1|':>9}{'|dlogp|':>9}{'resv GiB':>9}",
        "-" * 124,
    ]


def levers_row(r):
    if "rollout_s" not in r:
        return f"{r['label']:<40}   " + ("out of GPU memory" if r.get("oom") else f"failed: {r['error']}")
    return (
        f"{r['label']:<40}{r['rollout_s']:>10.3g}{r['micro_step_s']:>9.3g}{r['batch']:>3}"
        f"{r['step_per_image_s']:>9.4g}{fmt(r['speedup_per_image'], '.3f'):>8}"
        f"{fmt(r['micro_step_pct_peak'], '.1f'):>8}{r['first_calls_s']:>10.3g}"
        f"{r['ratio_max_abs_minus_1']:>9.2e}{r['log_prob_max_abs_vs_eager']:>9.2e}{fmt(r['reserved_gib'], '.1f'):>9}"
    )


def format_levers(res):
    return "\n".join([*levers_head(res), *map(levers_row, res["rows"])])


def quant_error(args):
    """The price of --quantize in accuracy: the velocity of the quantized base against the model dtype's, on the same
    random inputs and the same random weights of the released configuration (--num_blocks K at full width):
    relative L2 error ||v_q - v|| / ||v|| and max |v_q - v| / max |v|, per kind."""
    device, dtype = args.device, rollout.DTYPES[args.mixed_precision]
    out = {"blocks": args.num_blocks or 60, "dtype": args.mixed_precision, "resolution": args.resolution}
    for kind in quantize.QUANTIZE:
        pipe, _, _ = build_pipeline(args, device, dtype, kind)  # the same seed: the same weights before quantizing
        traj, x = make_trajectory(pipe, args, device, dtype)
        with torch.no_grad():
            v = rollout.predict_velocity(pipe.transformer, traj, x, traj.timesteps[STEP]).float()
        if kind == "none":
            reference = v
            continue
        out[f"{kind}_rel_l2"] = ((v - reference).norm() / reference.norm()).item()
        out[f"{kind}_rel_max"] = ((v - reference).abs().max() / reference.abs().max()).item()
        del pipe
    return out


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table_head(res):
    tok, built, full = res["tokens"], res["blocks_built"], res["blocks_full"]
    card = f" | as on a {res['card_gib']:g} GiB card (the rest held away)" if res["card_gib"] else ""
    return [
        f"device {res['device']} ({res['threads']} CPU threads) | {res['dtype']}, quantize {res['quantize']} | "
        f"{res['size']} size, hidden {res['hidden']} | bf16 dense peak {fmt(res['peak_tflops'], 'g')} TFLOP/s | "
        f"judge stand-in {res['judge_gib']:g} GiB{card}",
        f"{res['resolution']} px, {res['layers']} layers: {tok['noise']} noise + {tok['condition']} condition + "
        f"{tok['text']} text tokens | G {res['group_size']}, train_batch_size {res['train_batch_size']}, LoRA r "
        f"{res['rank']}, gradient checkpointing | median of {res['repeats']} after {res['warmup']} warm-up",
        f"{built} of {full} blocks built"
        + (
            ""
            if built == full
            else f"; figures scaled to {full}: time x FLOP("
            f"{full})/FLOP({built}), memory + {full - built} x one block's "
            "resident bytes (measured ones in --json)"
        ),
        "",
        f"{'measurement':<44}{'batch':>6}{'time s':>9}{'FLOP':>10}{'TFLOP/s':>9}{'% peak':>8}"
        f"{'alloc GiB':>10}{'resv GiB':>9}",
        "-" * 105,
    ]


def table_row(r, card_gib=None):
    if r.get("oom"):
        return f"{r['label']:<44}{r['batch']:>6}   out of GPU memory" + (
            f": does not fit a {card_gib:g} GiB card" if card_gib else ""
        )
    if r.get("error"):
        return f"{r['label']:<44}{r['batch']:>6}   failed: {r['error']}"
    return (
        f"{r['label']:<44}{r['batch']:>6}{r['seconds']:>9.3g}{fmt(r['flop'], '.3g'):>10}"
        f"{fmt(r['tflops'], '.3g'):>9}{fmt(r['pct_peak'], '.1f'):>8}{fmt(r['alloc_gib'], '.2f'):>10}"
        f"{fmt(r['reserved_gib'], '.2f'):>9}"
    )


def table_tail(res):
    e = res["train_step_estimate"]
    return [
        "",
        *[f"ratio {k}: {fmt(v, '.3f')}" for k, v in res["ratios"].items()],
        f"one train.py step, 1 image, judge excluded: {e['rollout_steps']} rollout steps (LoRA)"
        f"{' + decode' if 'seconds' in res['rows'].get('decode', {}) else ''} + {e['micro_steps']} micro-steps = "
        f"{fmt(e['seconds'], '.4g')} s",
    ]


def format_table(res):
    """The results as a plain-text table (run() prints it a row at a time)."""
    return "\n".join(
        [*table_head(res), *(table_row(r, res["card_gib"]) for r in res["rows"].values()), *table_tail(res)]
    )


def onpolicy_ratio(args):
    """One SDE step of G rows at batch G (as a rollout), re-scored in micro-batches of --train_batch_size (as the
    update): ratio = exp(log_prob_new - log_prob_old) per row, with LoRA B weights drawn N(0, 0.02) so the adapter
    is active. Fully on-policy, so any distance from 1 is the batch shape's rounding in --mixed_precision."""
    device, dtype = args.device, rollout.DTYPES[args.mixed_precision]
    pipe, blocks, _ = build_pipeline(args, device, dtype)
    transformer = pipe.transformer
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    traj, x = make_trajectory(pipe, args, device, dtype)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad(), lora.lora_precision(transformer):
        for p in params:
            p.normal_(0, 0.02, generator=g)
        v = rollout.predict_velocity(transformer, traj, x, traj.timesteps[STEP])  # (G, S, 64) at batch G
        prev, old, _, _ = rollout.sde_step_with_logprob(
            v, x, traj.sigmas[STEP], traj.sigmas[STEP + 1], args.noise_level, generator=g
        )
        traj.latents, traj.log_probs = torch.stack([x, prev], 1), old[:, None]
        new = torch.cat(
            [
                rollout.step_log_prob(transformer, traj, 0, rows)[0]
                for rows in torch.arange(args.group_size).split(args.train_batch_size)
            ]
        )
    ratio = torch.exp(new - old).double()
    return {
        "blocks": blocks,
        "dtype": args.mixed_precision,
        "resolution": args.resolution,
        "group_size": args.group_size,
        "train_batch_size": args.train_batch_size,
        "ratio_mean_minus_1": (ratio.mean() - 1).item(),
        "ratio_max_abs_minus_1": (ratio - 1).abs().max().item(),
    }


def scaling(args, steps=6, images_per_step=4):
    """train.py on the tiny model, --images_per_step 4, as 1 process and as 2 gloo ranks (OMP_NUM_THREADS=1 each):
    images per second from the steps' wall time (time/step_s in metrics.jsonl, the first step left out)."""
    import os
    import subprocess
    import tempfile

    out, env = {}, {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data.write_references(tmp + "/images", 4, seed=args.seed, size=(64, 48), images_only=True)
        flags = [
            "train.py",
            "--images",
            tmp + "/images",
            "--pretrained_model_name_or_path",
            "tiny",
            "--resolution",
            "64",
            "--layers",
            "2",
            "--group_size",
            "4",
            "--num_inference_steps",
            "4",
            "--rank",
            "4",
            "--lora_alpha",
            "8",
            "--mixed_precision",
            "no",
            "--reward",
            "recon",
            "--report_to",
            "none",
            "--sample_every",
            "0",
            "--images_per_step",
            str(images_per_step),
            "--max_train_steps",
            str(steps),
        ]
        for ranks in (1, 2):
            launch = (
                [sys.executable]
                if ranks == 1
                else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
            )
            subprocess.run(
                [*launch, *flags, "--output_dir", f"{tmp}/r{ranks}"], env=env, check=True, capture_output=True
            )
            rows = [json.loads(line) for line in Path(f"{tmp}/r{ranks}/metrics.jsonl").read_text().splitlines()]
            out[f"images_per_s_{ranks}"] = images_per_step * (len(rows) - 1) / sum(r["time/step_s"] for r in rows[1:])
    out["ratio_2_over_1"] = out["images_per_s_2"] / out["images_per_s_1"]
    return out


class _Judge(BaseHTTPRequestHandler):
    """A canned OpenAI-compatible judge: GET /models, POST /chat/completions answered after server.delay seconds
    with deterministic scores for the JSON keys the prompt asks for."""

    def log_message(self, *a):
        pass

    def reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply({"data": [{"id": "judge"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        keys = re.findall(r'"(\w+)": <1-9>', request["messages"][0]["content"][1]["text"])
        time.sleep(self.server.delay)
        text = json.dumps({k: 1 + (len(k) + i) % 9 for i, k in enumerate(keys)})
        self.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


def _serve_judge(port, delay):
    server = ThreadingHTTPServer(("127.0.0.1", port), _Judge)
    server.daemon_threads, server.delay = True, delay
    server.serve_forever()


def overlap(args, delay, steps=4, images=4):
    """train.py on the tiny model (G 4, 4 images per step) against a real OpenAI-compatible judge on 127.0.0.1 (its
    own process, as a judge elsewhere would be) that answers every request after `delay` seconds. Median step
    time and time the loop waited for the judge, with each group judged after its rollout in the main thread
    (serial) and in threads while the next groups roll out (overlapped, the default). The first step is left out.
    The bound uses the serial run's parts, R (rollouts), U (update) and c (a group's judge time beyond D):
        gpu_s   = R + U                  the torch work alone
        bound_s = R + c + D + U          the update needs every group's rewards (either --adv_std)
    """
    import multiprocessing
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=_serve_judge, args=(port, delay), daemon=True)
    server.start()
    url, out = f"http://127.0.0.1:{port}/v1", {}
    modes = {"serial": ["--no-judge_overlap"], "overlapped": ["--judge_overlap"]}
    side, threads = args.resolution or 64, torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)  # as the table's toy rows; the other core is the judge client's
    try:
        for _ in range(100):  # wait until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            data.write_references(
                tmp + "/images", images, seed=args.seed, size=(side, side * 3 // 4), images_only=True
            )
            for name, flags in modes.items():
                train.main(
                    [
                        "--images",
                        tmp + "/images",
                        "--pretrained_model_name_or_path",
                        "tiny",
                        "--resolution",
                        str(side),
                        "--layers",
                        "2",
                        "--group_size",
                        "4",
                        "--num_inference_steps",
                        "4",
                        "--rank",
                        "4",
                        "--lora_alpha",
                        "8",
                        "--mixed_precision",
                        "no",
                        "--judge_url",
                        url,
                        "--judge_model",
                        "judge",
                        "--report_to",
                        "none",
                        "--sample_every",
                        "0",
                        "--images_per_step",
                        str(images),
                        "--max_train_steps",
                        str(steps),
                        "--output_dir",
                        f"{tmp}/{name}",
                        *flags,
                    ]
                )
                rows = [json.loads(line) for line in Path(f"{tmp}/{name}/metrics.jsonl").read_text().splitlines()][1:]
                for key in ("step", "judge_wait", "rollout", "train"):
                    out[f"{name}_{key}_s"] = statistics.median(r[f"time/{key}_s"] for r in rows)
    finally:
        server.terminate()
        torch.set_num_threads(threads)
    R, U, c = out["serial_rollout_s"], out["serial_train_s"], out["serial_judge_wait_s"] / images - delay
    out.update(delay_s=delay, gpu_s=R + U, bound_s=R + c + delay + U)
    out.update(overlapped_over_bound=out["overlapped_step_s"] / out["bound_s"])
    return out


def loop(args):
    """train.py's whole loop at full width without a download: --pretrained_model_name_or_path random[:K]
    (tiny.released_pipeline), one square synthetic image per step, --reward vlm with the tiny judge (on the CPU),
    the other flags train.py's defaults or this benchmark's (--group_size, --train_batch_size, --rank, --layers,
    --resolution, --num_inference_steps, --sde_window, --beta, --mixed_precision). Step 1 runs and is checkpointed;
    a second train.main resumes from it (a fresh build, as a restarted job) and runs step 2. Per step: time/step_s and
    its parts, peak GiB allocated and reserved (CUDA); the checkpoint's size and write time (runs.save_checkpoint,
    timed where train.py calls it). Written to --json after each step, so a run stopped in step 2 keeps step 1."""
    import gc
    import tempfile

    import runs

    model = "random" + (f":{args.num_blocks}" if args.num_blocks else "")
    save, writes = runs.save_checkpoint, []

    def timed_save(*a, **kw):  # train.py calls runs.save_checkpoint: time it and weigh what it wrote
        t = time.perf_counter()
        folder = save(*a, **kw)
        writes.append((time.perf_counter() - t, sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())))
        return folder

    with tempfile.TemporaryDirectory() as tmp:
        data.write_references(tmp + "/images", 2, seed=args.seed, size=(args.resolution,) * 2, images_only=True)
        argv = [
            "--images",
            tmp + "/images",
            "--output_dir",
            tmp + "/run",
            "--pretrained_model_name_or_path",
            model,
            "--device",
            args.device,
            "--mixed_precision",
            args.mixed_precision,
            "--resolution",
            str(args.resolution),
            "--layers",
            str(args.layers),
            "--group_size",
            str(args.group_size),
            "--train_batch_size",
            str(args.train_batch_size),
            "--rank",
            str(args.rank),
            "--lora_alpha",
            str(args.lora_alpha),
            "--num_inference_steps",
            str(args.num_inference_steps),
            "--sde_window",
            str(args.sde_window),
            "--beta",
            str(args.beta),
            "--seed",
            str(args.seed),
            "--images_per_step",
            "1",
            "--reward",
            "vlm",
            "--judge",
            "tiny",
            "--checkpointing_steps",
            "1",
            "--sample_every",
            "0",
            "--report_to",
            "none",
        ]
        runs.save_checkpoint = timed_save
        try:
            for steps, resume in ((1, []), (2, ["--resume_from_checkpoint", "latest"])):
                pipe = train.main([*argv, "--max_train_steps", str(steps), *resume])
                del pipe  # free the first build before the second: two copies of 38 GiB need not fit
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
                out = {"model": model, "steps": [r["step"] for r in rows]}
                for r in rows:
                    for key in (
                        "time/step_s",
                        "time/rollout_s",
                        "time/train_s",
                        "mem/peak_gb",
                        "mem/reserved_gb",
                        "diag/ratio_mean",
                        "reward/mean",
                    ):
                        if key in r:
                            out[f"step{r['step']} {key}"] = r[key]
                out.update(
                    checkpoint_mib=writes[-1][1] / 2**20,
                    checkpoint_write_s=statistics.median(s for s, _ in writes),
                    checkpoints_written=len(writes),
                    complete=steps == 2,
                )
                print(
                    f"bench --loop, after step {steps}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float)),
                    flush=True,
                )
                write_json(args.json, out)
        finally:
            runs.save_checkpoint = save
    return out


def main(argv=None):
    args = parse_args(argv)
    quantize.check(args.quantize, args.device)  # one line if this machine cannot run it
    mode = next(
        (
            f
            for flag, f in (
                (args.loop, loop),
                (args.overlap is not None, lambda a: overlap(a, a.overlap)),
                (args.scaling, scaling),
                (args.ratio, onpolicy_ratio),
                (args.quant_error, quant_error),
            )
            if flag
        ),
        None,
    )
    if mode:  # one line of figures
        res = mode(args)
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    else:  # a table, printed a row at a time (and --json written after each row)
        threads = torch.get_num_threads()
        try:
            res = levers(args) if args.levers else run(args)
        finally:
            torch.set_num_threads(threads)  # run() may lower it; callers (tests) get theirs back
    write_json(args.json, res)
    if args.json:
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    try:
        res = main()
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    rows = res.get("rows", {})
    failed = [r["label"] for r in (rows.values() if isinstance(rows, dict) else rows) if "error" in r]
    if failed:  # out of memory is an answer; any other error is a failure, its traceback printed where it happened
        sys.exit(f"error: {len(failed)} row(s) failed: {'; '.join(failed)}")
