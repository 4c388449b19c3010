"""Supervised warm start: flow matching of Qwen-Image-Layered on layered designs (paired layers), with LoRA.

The target is the latent the sampler in rollout.py produces and rollout.decode_layers reads: L+1 frames, frame 0
the composite (the flattened image), frames 1..L the RGBA layers back to front (layer 0 the background), each
VAE-encoded on its own and packed by the pipeline's _pack_latents; the condition image's tokens are appended after
them as in sampling and are never a target. Data: synthetic designs made on the fly in DataLoader workers (the
SynLayers idea: free, L-balanced supervision; nothing written to disk) or a folder in the reference format.

    # CPU dry run on the tiny random model (seconds to two minutes, depending on how busy the cores are)
    python sft.py --pretrained_model_name_or_path tiny --synthetic 64 --resolution 64 --layers 2 3 \\
        --max_train_steps 40 --output_dir outputs/sft-tiny --report_to none
    # one GPU: 50K synthetic designs (where SynLayers' gains saturate), 2-4 layers, held out on Crello
    python data.py crello crello_val --split validation --num_samples 64
    python sft.py --synthetic 50000 --max_train_steps 50000 --validation_data crello_val --output_dir outputs/sft
    # your own layered designs (one folder per sample: image.png, layer_0.png ... layer_{L-1}.png)
    python sft.py --data my_layers/ --output_dir outputs/sft
    # is the generator fast enough? designs/s of one worker and workers a GPU step needs
    python sft.py --measure_data 20 --resolution 640 --layers 2 3 4
    # then GRPO from the supervised LoRA, and the held-out loss of any LoRA (same held-out flags, same draws)
    python train.py --images my_designs/ --init_lora outputs/sft
    python sft.py --eval_lora outputs/stable-layers --validation_data crello_val

Departures from diffusers' examples/dreambooth/train_dreambooth_lora_qwen_image.py (same objective, same
--weighting_scheme / --logit_mean / --logit_std / --mode_scale and their defaults):
- the sigma table is shifted: the example looks sigma up in the scheduler's unshifted 1000-entry table (Qwen-Image's
  scheduler shifts dynamically, only in set_timesteps); here the same table goes through the scheduler's own
  set_timesteps with the layered model's mu = sqrt(condition tokens / 256) (linear time shift, mu = 2.5 at 640 px),
  so training visits the noise levels the sampler visits;
- latents are the VAE distribution's mode (as the pipeline encodes the condition image), not a sample;
- one design per forward, --gradient_accumulation_steps for larger batches: Layer3D RoPE reads only the first
  sample's shapes, and designs differ in size and layer count;
- LoRA on train.py's targets (Flow-GRPO's), so the adapter continues under train.py --init_lora; DiffSynth-Studio's
  Qwen-Image-Layered recipe (rank 32, lr 1e-4: the defaults here) also adapts img_mod/txt_mod, not mlp.net.0;
- the fixed released prompt, no captions; constant learning rate (the example's default scheduler).
"""

import argparse
import dataclasses
import math
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import data
import lora
import rollout
from support import checkpoints, cli, quantize, runfolder, tracking
from support.images import layer_indices, open_image

with quantize.quiet_imports():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

FLOP_PER_FORWARD = 1.99e14  # one forward at 640 px, 4 layers (9,611 tokens): shared notes, section 7


# ----------------------------------------------------------------------------- data (runs in DataLoader workers)
def rng_seed(*parts):
    """A 32-bit seed (what torch's CPU generator uses) hashed from a tuple of ints by numpy's SeedSequence:
    (seed, 0, step, micro) for training draws, (seed, 1, j) for held-out sample j, (seed, 2, epoch) for the order."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def synthetic_specs(num, seed, layers, size, held_out=False):
    """Design k: data.make_design(numpy.random.default_rng([seed, k]), layers[k % len(layers)], (size, size)), the
    convention of `data.py synthetic` (L balanced by construction); held-out designs use [seed, k, 1], a stream
    the training designs never draw."""
    return [
        {
            "name": f"synthetic design {k}{' (held out)' if held_out else ''}",
            "entropy": [seed, k, 1] if held_out else [seed, k],
            "layers": layers[k % len(layers)],
            "size": size,
        }
        for k in range(num)
    ]


def sample_problem(folder, max_layers):
    """(why the reference sample in `folder` cannot be trained on, in one line, or None; its L). Reads PNG
    headers only."""
    if not (folder / "image.png").is_file():
        return "no image.png (the flattened design)", 0
    try:
        found = layer_indices(folder, required=True)
    except ValueError as e:
        return str(e), 0
    if len(found) > max_layers:
        return f"{len(found)} layers, more than --max_layers {max_layers}", len(found)
    try:
        size = Image.open(folder / "image.png").size
        for i in found:
            if Image.open(folder / f"layer_{i}.png").size != size:
                w, h = Image.open(folder / f"layer_{i}.png").size
                return (
                    f"layer_{i}.png is {w}x{h} but image.png is {size[0]}x{size[1]} (layers must have its size)",
                    len(found),
                )
    except OSError as e:
        return f"an unreadable PNG ({e.__class__.__name__})", len(found)
    return None, len(found)


def folder_specs(root, max_layers, flag):
    """The usable samples of a reference folder (one subfolder each: image.png, layer_0.png .. layer_{L-1}.png,
    the reference format of support/images.py). A sample that breaks a rule is skipped with one line naming it and
    the rule; none left: one line and exit 2."""
    root = Path(root)
    if not root.is_dir():
        raise cli.InputError(f"{flag} {root}: no such folder")
    specs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        problem, num_layers = sample_problem(folder, max_layers)
        if problem:
            print(f"skipping sample {folder}: {problem}", file=sys.stderr)
        else:
            specs.append({"name": str(folder), "folder": str(folder), "layers": num_layers})
    if not specs:
        raise cli.InputError(f"{flag} {root}: no usable sample left (see the lines above)")
    return specs


def load_sample(spec):
    """(name, flattened RGB image, [L RGBA layers], layer 0 the background) as PIL images."""
    if "folder" in spec:
        folder = Path(spec["folder"])
        layers = [Image.open(folder / f"layer_{i}.png").convert("RGBA") for i in range(spec["layers"])]
        return spec["name"], open_image(folder / "image.png"), layers
    image, layers = data.make_design(np.random.default_rng(spec["entropy"]), spec["layers"], (spec["size"],) * 2)
    return spec["name"], image, layers


class Samples(torch.utils.data.Dataset):
    """Sample i made (synthetic) or read (folder) and turned into frames inside a DataLoader worker, so the main
    process only encodes; deterministic by its spec alone. Returns (name, pixels (L+1, 4, H, W) in [-1, 1])."""

    def __init__(self, specs, resolution, image_processor):
        self.specs, self.resolution = specs, resolution
        self.pipe = types.SimpleNamespace(image_processor=image_processor)  # all rollout.prepare_images reads

    def __len__(self):
        return len(self.specs)

    def __getitem__(self, i):
        name, image, layers = load_sample(self.specs[i])
        return name, sample_pixels(self.pipe, image, layers, self.resolution)


def data_order(args, num, start):
    """Sample index of every (step, micro-step) from `start` on: position p = step * accumulation + micro walks
    epoch-wise permutations seeded by (seed, epoch), so a resumed run sees the same designs in the same order."""
    order, perms = [], {}
    for p in range(start * args.gradient_accumulation_steps, args.max_train_steps * args.gradient_accumulation_steps):
        epoch = p // num
        if epoch not in perms:
            perms[epoch] = torch.randperm(num, generator=torch.Generator().manual_seed(rng_seed(args.seed, 2, epoch)))
        order.append(int(perms[epoch][p % num]))
    return order


# ----------------------------------------------------------------------------- the target latent
def sample_pixels(pipe, image, layers, resolution):
    """Frames (L+1, 4, H, W) in [-1, 1]; pipe: anything holding the pipeline's image_processor. Frame 0: the
    flattened image exactly as sampling prepares the condition (rollout.prepare_images: resized to
    rollout.condition_size, RGBA with alpha 1); frames 1..L: the RGBA layers resized to the same H, W by the
    pipeline's image processor (PIL, premultiplied alpha)."""
    composite, _, height, width = rollout.prepare_images(pipe, [image], resolution)  # (1, 4, 1, H, W)
    stack = pipe.image_processor.preprocess([layer.convert("RGBA") for layer in layers], height, width)  # (L, 4, H, W)
    return torch.cat([composite[:, :, 0], stack])


@torch.no_grad()
def pack_target(pipe, pixels):
    """x0 (1, (L+1) h w / 4, 64) and the condition tokens (1, h w / 4, 64), h, w = H/8, W/8.

    Every frame is encoded alone by the RGBA VAE (mode, normalised (z - latents_mean) / latents_std by the
    pipeline's _encode_vae_image), stacked as (1, L+1, 16, h, w) and packed by the pipeline's _pack_latents in 2x2
    patches, frame-major (frame 0's tokens first): the layout prepare_latents gives the noise and _unpack_latents
    reads back. The condition is frame 0 packed alone, as prepare_latents packs the image latents."""
    vae = pipe.vae
    z = pipe._encode_vae_image(pixels.unsqueeze(2).to(vae.device, vae.dtype), generator=None)  # (L+1, 16, 1, h, w)
    frames = z[:, :, 0].unsqueeze(0)  # (1, L+1, 16, h, w)
    _, f, c, h, w = frames.shape
    x0 = pipe._pack_latents(frames, 1, c, h, w, f)  # (1, (L+1) h w / 4, 64)
    cond = pipe._pack_latents(frames[:, :1], 1, c, h, w, 1)  # (1, h w / 4, 64)
    return x0.float(), cond.to(pipe.transformer.dtype)


def sigma_table(pipe, cond_tokens, cache):
    """(N,) the training table sigma_k = (N - k) / N, k = 0..N-1 (N = num_train_timesteps), shifted by the
    scheduler's own set_timesteps with the sampler's mu = sqrt(cond_tokens / 256); linear: mu / (mu + 1/sigma - 1)."""
    if cond_tokens not in cache:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        n = scheduler.config.num_train_timesteps
        scheduler.set_timesteps(sigmas=np.arange(n, 0, -1) / n, mu=(cond_tokens / 256) ** 0.5)
        cache[cond_tokens] = scheduler.sigmas[:-1].cpu()  # set_timesteps appends a terminal 0
    return cache[cond_tokens]


def draw_sigma(args, table, generator):
    """u ~ --weighting_scheme's density on [0, 1) (diffusers' compute_density_for_timestep_sampling), then
    sigma = table[floor(u N)], as the diffusers example indexes its table. Returns (1,) float32."""
    u = compute_density_for_timestep_sampling(
        args.weighting_scheme, 1, args.logit_mean, args.logit_std, args.mode_scale, generator=generator
    )
    return table[(u * len(table)).long().clamp(0, len(table) - 1)]


# ----------------------------------------------------------------------------- the objective
def flow_matching_loss(transformer, prompt, x0, cond, sigma, noise, layers, height, width, weighting_scheme):
    """Flow matching (rectified flow), as diffusers' Qwen-Image example, on the layered target:
        x_t    = (1 - sigma) x0 + sigma noise,      noise ~ N(0, I)
        target = noise - x0                          (the velocity dx_t/dsigma)
        loss   = w(sigma) * MEAN over the (L+1) h w / 4 target tokens and 64 channels of (v(x_t, sigma) - target)^2
    w = compute_loss_weighting_for_sd3(--weighting_scheme) (1 for "none"). v: the transformer on [x_t tokens,
    condition tokens] with timestep sigma, sliced back to the x_t tokens: rollout.predict_velocity, the code the
    sampler integrates, given a Trajectory holding only what it reads (no CFG).
    x0, noise (B, S, 64) float32, sigma (B,). Returns the loss per sample (B,)."""
    inputs = {
        **{f.name: None for f in dataclasses.fields(rollout.Trajectory)},
        "image_latents": cond,
        "prompt_embeds": prompt[0],
        "prompt_embeds_mask": prompt[1],
        "num_layers": layers,
        "height": height,
        "width": width,
        "true_cfg_scale": 1.0,
        "cfg_normalize": False,
    }
    s = sigma.view(-1, 1, 1)
    latents = (1 - s) * x0 + s * noise  # (B, S, 64)
    v = rollout.predict_velocity(
        transformer, rollout.Trajectory(**inputs), latents, sigma * 1000
    ).float()  # predict_velocity takes scheduler timesteps (sigma * 1000)
    weight = compute_loss_weighting_for_sd3(weighting_scheme, sigmas=sigma)
    return weight * ((v - (noise - x0)) ** 2).mean(dim=(1, 2))


def prepare(pipe, pixels, args, generator, tables):
    """Frames (L+1, 4, H, W) ready for the loss: (x0, cond, sigma, noise, L, H, W) on the model's device; sigma
    and noise drawn from `generator`."""
    x0, cond = pack_target(pipe, pixels)
    sigma = draw_sigma(args, sigma_table(pipe, cond.shape[1], tables), generator)
    noise = torch.randn(x0.shape, generator=generator)
    return x0, cond, sigma.to(x0.device), noise.to(x0.device), len(pixels) - 1, *pixels.shape[-2:]


def supervised_step(pipe, prompt, batches, args, step, params, optimizer, tables):
    """One optimizer step over --gradient_accumulation_steps designs, one per forward: loss = MEAN over them of
    flow_matching_loss; gradient-norm clip; AdamW. Draws from (seed, 0, step, micro). A non-finite loss or
    gradient skips the update. Returns the step's scalars."""
    transformer, device = pipe.transformer, pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0, wait, losses, sigmas, counts, finite = time.perf_counter(), 0.0, [], [], [], True
    transformer.train()
    optimizer.zero_grad(set_to_none=True)
    for micro in range(args.gradient_accumulation_steps):
        t = time.perf_counter()
        _, pixels = next(batches)  # (name, frames (L+1, 4, H, W)) from a worker
        wait += time.perf_counter() - t
        draws = torch.Generator().manual_seed(rng_seed(args.seed, 0, step, micro))
        x0, cond, sigma, noise, L, H, W = prepare(pipe, pixels, args, draws, tables)
        with lora.lora_precision(transformer):
            loss = flow_matching_loss(transformer, prompt, x0, cond, sigma, noise, L, H, W, args.weighting_scheme)
        finite = finite and bool(torch.isfinite(loss).all())
        if finite:
            (loss.mean() / args.gradient_accumulation_steps).backward()
        losses.append(loss.mean().item())
        sigmas.append(sigma.item())
        counts.append(L)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    if finite and torch.isfinite(grad_norm):
        optimizer.step()
    else:
        tqdm.write(f"step {step + 1}: non-finite loss or gradient, update skipped")
    optimizer.zero_grad(set_to_none=True)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )  # GPU allocated, or CPU process RSS
    return {
        "loss": float(np.mean(losses)),
        "sigma": float(np.mean(sigmas)),
        "layers": counts,
        "train/grad_norm": grad_norm.item(),
        "train/skipped_updates": int(not finite),
        "time/step_s": time.perf_counter() - t0,
        "time/data_wait_s": wait,
        "mem/peak_gb": peak,
    }


@torch.no_grad()
def validate(transformer, prompt, held_out, args):
    """val/loss: MEAN over the held-out samples of flow_matching_loss, each with the sigma and noise drawn once
    from (seed, 1, j), so every evaluation sees the same draws."""
    transformer.eval()
    with lora.lora_precision(transformer):
        losses = [
            flow_matching_loss(transformer, prompt, *sample, args.weighting_scheme).item() for sample in held_out
        ]
    return float(np.mean(losses))


# ----------------------------------------------------------------------------- the generator's speed
def measure_data(args):
    """Designs per second of one worker (what a worker does, timed in this process on one thread; the tiny
    pipeline lends its image processor, built like the real one's) and the workers that keep a GPU busy. The GPU's
    time per design is estimated: 3 x the forward's FLOP (forward + backward; gradient checkpointing adds a 4th,
    so this is the fast bound) at 40% of an H100's 989 TFLOP/s, the FLOP scaled by the (L+2) frames' tokens."""
    designs = Samples(
        synthetic_specs(args.measure_data, args.seed, args.layers, args.resolution),
        args.resolution,
        rollout.load_pipeline("tiny").image_processor,
    )
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0, c0 = time.perf_counter(), time.process_time()
    for k in tqdm(range(len(designs)), desc="designs"):
        designs[k]
    rate = len(designs) / (time.process_time() - c0)  # per CPU second: one worker on a core of its own
    frames = float(np.mean(args.layers)) + 2  # L+1 target frames + the condition
    gpu_s = 3 * FLOP_PER_FORWARD * frames / 6 / (0.4 * 989e12)
    print(
        f"{rate:.2f} designs/s per worker ({len(designs) / (time.perf_counter() - t0):.2f} by the wall clock) at "
        f"{args.resolution} px, L in {args.layers}; the GPU needs ~{gpu_s:.2f} s per design (estimated) -> "
        f"{math.ceil(1 / (gpu_s * rate))} worker(s) keep it fed (use at least 2)"
    )
    return rate


# ----------------------------------------------------------------------------- command line
METHOD = "supervised flow matching (sft.py)"  # the model card's words


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="Supervised flow-matching LoRA for Qwen-Image-Layered on layered designs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help="reference-format folder: <sample>/image.png, layer_<i>.png")
    source.add_argument("--synthetic", type=int, default=None, help="N synthetic designs made on the fly")
    a("--layers", type=int, nargs="+", default=[2, 3, 4], help="layer counts of synthetic designs, balanced")
    a("--max_layers", type=int, default=10, help="samples with more layers are skipped (bounds a step's memory)")
    a("--validation_data", default=None, help="held-out reference-format folder (instead of --validation_synthetic)")
    a("--validation_synthetic", type=int, default=8, help="held-out synthetic designs (seed stream never trained on)")
    a("--validation_every", type=int, default=100, help="val/loss every N steps (also at step 0 and at the end)")
    g = p.add_argument_group("flow matching: the velocity loss and its timestep density")
    a = g.add_argument
    a("--resolution", type=int, default=640, help="condition size (longest side / area, see rollout.condition_size)")
    a("--prompt", default=rollout.DEFAULT_PROMPT, help="fixed prompt (the released setting)")
    a(
        "--weighting_scheme",
        default="none",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"],
        help="timestep density / loss weighting (diffusers' SD3 schemes); none = uniform u, weight 1",
    )
    a("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    a("--logit_std", type=float, default=1.0, help="std of the logit_normal density")
    a("--mode_scale", type=float, default=1.29, help="scale of the mode density")
    g = p.add_argument_group("the LoRA and its optimizer")
    a = g.add_argument
    a("--rank", type=int, default=32, help="LoRA rank r (DiffSynth-Studio's Qwen-Image-Layered recipe)")
    a("--lora_alpha", type=int, default=32, help="LoRA alpha (scale alpha / r = 1)")
    a("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (DiffSynth-Studio's recipe), constant")
    a("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay (diffusers' default)")
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip")
    a("--gradient_accumulation_steps", type=int, default=1, help="designs per optimizer step (one per forward)")
    g = p.add_argument_group("model, memory and speed")
    a = g.add_argument
    rollout.add_model_flags(g)
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute blocks")
    a("--dataloader_num_workers", type=int, default=2, help="DataLoader workers making/reading designs (0 = inline)")
    g = p.add_argument_group("the run: its folder, length, checkpoints, tracker and seed")
    a = g.add_argument
    tracking.add_run_flags(g, "outputs/sft", 2000, 500)
    a("--seed", type=int, default=42, help="seed of every draw: designs, data order, sigmas, noise")
    a("--measure_data", type=int, default=0, help="only time N synthetic designs (one worker) and exit")
    a("--eval_lora", default=None, help="only print the held-out val/loss of the base model + this LoRA and exit")
    args = p.parse_args(argv)
    checks = [
        (args.measure_data or args.eval_lora or args.data or args.synthetic, "give --data DIR or --synthetic N"),
        (args.synthetic is None or args.synthetic >= 1, "--synthetic must be >= 1"),
        (min(args.layers) >= 1 and max(args.layers) <= args.max_layers, "--layers must be in 1..--max_layers"),
        (
            args.gradient_accumulation_steps >= 1 and args.validation_every >= 1 and args.checkpointing_steps >= 1,
            "--gradient_accumulation_steps, --validation_every and --checkpointing_steps must be >= 1",
        ),
        (args.max_train_steps >= 0 and args.validation_synthetic >= 0, "counts must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.measure_data:
        return measure_data(args)
    output_dir = Path(args.output_dir)
    with cli.input_errors():  # setup: bad input (flags, files, the environment) is one line, exit 2
        if not args.eval_lora and runfolder.finished(output_dir, args.resume_from_checkpoint, args.max_train_steps):
            return None  # resumed at or past --max_train_steps: nothing to train, nothing written
        device, dtype = cli.pick_device(args.device, args.mixed_precision)
        lock = None if args.eval_lora else runfolder.claim_output_dir(output_dir, args.resume_from_checkpoint)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the diffusers example's --allow_tf32
        rollout.condition_size(Image.new("RGB", (args.resolution,) * 2), args.resolution)  # rejects a bad resolution
        if args.data:
            specs = folder_specs(args.data, args.max_layers, "--data")
        else:
            specs = synthetic_specs(args.synthetic or 0, args.seed, args.layers, args.resolution)
        if args.validation_data:
            held_out = folder_specs(args.validation_data, args.max_layers, "--validation_data")
        else:
            held_out = synthetic_specs(args.validation_synthetic, args.seed, args.layers, args.resolution, True)
        torch.manual_seed(args.seed)
        quantize.check(args.quantize, device)
        cli.check_hub(args.pretrained_model_name_or_path, cli.flag_value(args, "pretrained_model_name_or_path"))
        pipe = rollout.load_pipeline(args.pretrained_model_name_or_path, dtype, device, kind=args.quantize)
        if args.eval_lora:
            checkpoints.load_lora(pipe, args.eval_lora, flag="--eval_lora")
    embeds, mask = rollout.encode_prompt(pipe, args.prompt)
    prompt = (embeds.to(device, dtype), None if mask is None else mask.to(device))  # (1, T, D), (1, T)
    rollout.free_text_encoder(pipe)
    tables = {}  # the shifted sigma table of each condition token count
    held_out = Samples(held_out, args.resolution, pipe.image_processor)
    held_out = [
        prepare(pipe, held_out[j][1], args, torch.Generator().manual_seed(rng_seed(args.seed, 1, j)), tables)
        for j in range(len(held_out))
    ]  # encoded once: fixed sigma and noise per sample
    if args.eval_lora:
        loss = validate(pipe.transformer, prompt, held_out, args)
        print(
            f"val/loss {loss:.6f}: {args.pretrained_model_name_or_path} + {args.eval_lora}, {len(held_out)} held out"
        )
        return loss

    transformer = pipe.transformer
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    rollout.speed_up(transformer, args.attention_backend, args.compile)
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    with cli.input_errors():
        start = 0
        if args.resume_from_checkpoint:
            start = checkpoints.load_checkpoint(args.resume_from_checkpoint, output_dir, transformer, optimizer)
        log = tracking.RunLog(output_dir, args.report_to, config=vars(args))  # after resume rewrote metrics.jsonl
    loader = torch.utils.data.DataLoader(
        Samples(specs, args.resolution, pipe.image_processor),
        batch_size=None,
        sampler=data_order(args, len(specs), start),
        num_workers=args.dataloader_num_workers,
        pin_memory=device.startswith("cuda"),
    )
    batches = iter(loader)
    print(
        f"{len(specs)} training samples, {len(held_out)} held out, {sum(p.numel() for p in params) / 1e6:.2f}M "
        "LoRA parameters, " + cli.device_line(device, dtype, args.quantize)
    )
    timer = tracking.Timer()
    bar = tqdm(range(start, args.max_train_steps), initial=start, total=args.max_train_steps, desc="sft")

    save = checkpoints.saver(output_dir, transformer, optimizer, args, METHOD)
    with tracking.guard(
        output_dir, timer, save, close=lambda: (bar.close(), log and log.close(), runfolder.release(lock))
    ):
        if start == 0 and held_out:
            log.log({"step": 0, "val/loss": validate(transformer, prompt, held_out, args)})
        for step in bar:
            with timer("train"):
                record = {
                    "step": step + 1,
                    **supervised_step(pipe, prompt, batches, args, step, params, optimizer, tables),
                }
            if held_out and ((step + 1) % args.validation_every == 0 or step + 1 == args.max_train_steps):
                with timer("validate"):
                    record["val/loss"] = validate(transformer, prompt, held_out, args)
            if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.max_train_steps:
                with timer("checkpoint"):
                    save(step + 1, record)
            log.log(record)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", "val/loss") if k in record})
    checkpoints.save_final(output_dir, transformer, args, method=METHOD)
    log.close()
    runfolder.release(lock)
    print(runfolder.written(output_dir))
    return pipe


if __name__ == "__main__":
    main()
