"""Rollouts for Stable-Layers: G candidate layer decompositions per image, with Flow-GRPO log-probs.

Qwen-Image-Layered turns one RGB image into N RGBA layers by denoising N+1 latent frames (frame 0 the
composite, frames 1..N the layers, back to front) conditioned on the VAE latents of the input image.
This file samples that process with the Flow-GRPO SDE step (Liu et al., "Flow-GRPO", arXiv:2505.05470,
section "ODE to SDE": the Euler-Maruyama step of the reverse SDE and its Gaussian policy), records what
the GRPO update needs, decodes the layers, and re-scores stored transitions under the current policy.

    # the sampler alone on the tiny random model (CPU, seconds): PNGs under outputs/rollout/
    python rollout.py --images examples --pretrained_model_name_or_path tiny --resolution 64
    # the real model on one GPU: 4 candidates per image at the released settings, SDE on every step
    python rollout.py --images my_designs/ --group_size 4 --num_inference_steps 10 --noise_level 1.2

Departures from diffusers' QwenImageLayeredPipeline.__call__ (with noise_level=0 the layers match it to
1e-5, see test_smoke.py): the sampler state stays in float32 between steps (diffusers rounds it to the
model dtype and forms dt * v in bf16 on a bf16 model); batches of several images are decoded and regrouped
here (diffusers 0.42.1 splits batched output wrongly); group members are consecutive rows.
"""

import argparse
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from support import cli, quantize, tiny
from support.checkpoints import load_lora
from support.images import find_images, open_image, save_layers, to_rgb

with quantize.quiet_imports():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions
    from diffusers.utils.torch_utils import randn_tensor

DEFAULT_MODEL = "Qwen/Qwen-Image-Layered"
DEFAULT_PROMPT = "a clean, well composed image"  # the released Stable-Layers LoRA's fixed prompt


# ----------------------------------------------------------------------------- loading
def load_pipeline(
    pretrained_model_name_or_path=DEFAULT_MODEL, torch_dtype=None, device=None, captioning=False, kind="none"
):
    """A QwenImageLayeredPipeline from a hub id or local folder; "tiny" for the tiny random one, "random" for the
    released configuration with random weights (built on `device`; "random:K" builds K of the 60 blocks).

    The captioning processor is skipped unless `captioning` (it needs torchvision; only auto-captions use it).
    kind ("int8", "nf4"; support/quantize.py): the transformer blocks' linears are quantized on their way to
    `device`, so the model dtype's weights never need to fit it.
    """
    name = pretrained_model_name_or_path
    if name == "tiny":
        pipe = tiny.tiny_pipeline()
        if torch_dtype not in (None, torch.float32):
            pipe.to(dtype=torch_dtype)
    elif name == "random" or name.startswith("random:"):
        blocks = name.partition(":")[2]
        if blocks and not (blocks.isdigit() and 1 <= int(blocks) <= 60):
            raise ValueError(f"--pretrained_model_name_or_path {name}: write random or random:K with K in 1..60")
        pipe = tiny.released_pipeline(int(blocks or 60), device or "cpu", torch_dtype or torch.float32)
    else:
        extra = {} if captioning else {"processor": None}
        try:
            pipe = QwenImageLayeredPipeline.from_pretrained(
                pretrained_model_name_or_path, torch_dtype=torch_dtype, **extra
            )
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r}: cannot load the "
                f"pipeline ({str(e).splitlines()[0]}); give a hub id, a downloaded folder, or 'tiny'."
            ) from None
    quantize.quantize_blocks(pipe.transformer, kind, device)  # "random" was built on `device`: quantized in place
    if device is not None:
        pipe.to(device)
    if kind != "none" and str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # the model dtype's blocks are gone: let the memory figures show it
    pipe.set_progress_bar_config(disable=True)
    return pipe


ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flash", "_flash_3")


def add_model_flags(parser, speed=True):
    """The flags that load and run the pipeline, one definition for every script that loads it: the model, its
    dtype, its quantization, the device, and (speed) the levers of speed_up."""
    a = parser.add_argument
    a(
        "--pretrained_model_name_or_path",
        default=DEFAULT_MODEL,
        help="hub id, local folder, 'tiny', or 'random[:K]' (the released configuration with random weights, K of "
        "its 60 blocks: the real model offline)",
    )
    a(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        default="bf16",
        help="the model's dtype on CUDA (CPU: fp32)",
    )
    a(
        "--quantize",
        default="none",
        choices=list(quantize.QUANTIZE),
        help="the frozen transformer blocks in fewer bits, a LoRA in fp32 on top (support/quantize.py): int8 "
        "(torchao, a 48 GB card) or nf4 (bitsandbytes, 24 GB)",
    )
    a("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    if speed:
        a(
            "--compile",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="regional torch.compile of the repeated transformer block, LoRA included (rollout.speed_up; the "
            "first step pays the compile)",
        )
        a(
            "--attention_backend",
            default=None,
            choices=ATTENTION_BACKENDS,
            help="attention kernel through diffusers' dispatcher, e.g. _native_cudnn on Hopper (default: PyTorch's "
            "SDPA choice; rollout.speed_up)",
        )


def speed_up(transformer, attention_backend=None, compile=False):
    """The transformer's speed levers, applied once its LoRA is in place (bench.py --levers measures them;
    docs/performance.md):
    - attention_backend: a kernel of diffusers' attention dispatcher (set_attention_backend), e.g. "_native_cudnn";
      None keeps PyTorch's own SDPA choice. Qwen-Image passes no attention mask when every text token is real, so
      the fused kernels apply;
    - compile: regional compilation of the repeated block (diffusers' compile_repeated_blocks; fullgraph, so a graph
      break fails loudly), peft's LoRA layers traced into it; the first step compiles the rollout's, the
      re-scoring's and the KL reference's graphs.
    Both change the arithmetic's order, not what is computed (tests/test_precision.py states the bounds on the
    log-probs), and the rollout and its re-scoring run under the same levers. diffusers keeps the attention choice
    process-wide."""
    if attention_backend:
        transformer.set_attention_backend(attention_backend)
    if compile:
        # inductor keeps bf16 intermediates in fp32 inside fused kernels unless told to round where eager rounds:
        # without this, the rollout's (no-grad) and the re-scoring's (training) graphs fuse differently and the
        # first ratio moved by 1.3e-4 on CPU bf16, more than --clip_range; with it, 0 (test_precision.py)
        import torch._dynamo.config
        import torch._inductor.config

        torch._inductor.config.emulate_precision_casts = True
        # graphs of the one block function: 2 block kinds (the last has fewer LoRA layers) x rollout, re-scoring (the
        # first block's input needs no gradient, the others' do) and KL reference, x each shape (--layers, batch):
        # past torch's default of 8, fullgraph would stop the run instead of compiling one more
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        transformer.compile_repeated_blocks(fullgraph=True)


# ----------------------------------------------------------------------------- condition images
def condition_size(image, resolution, sizing="longest"):
    """(width, height) of the condition image, aspect kept.
    sizing "longest" (the released Stable-Layers inference; default): the longest side becomes `resolution`, the
        other is scaled to match, both rounded DOWN to multiples of 16 (a 4:3 input at 640 -> 640x480, 16:9 ->
        640x352);
    sizing "area" (diffusers' QwenImageLayeredPipeline.__call__, calculate_dimensions): about resolution^2 pixels,
        sides multiples of 32 (4:3 -> 736x544, 16:9 -> 864x480: 1.84x the tokens and another shift mu)."""
    if sizing == "area":
        if resolution % 32:
            raise ValueError(f"--resolution {resolution}: must be a multiple of 32 with --sizing area")
        return calculate_dimensions(resolution * resolution, image.size[0] / image.size[1])
    if sizing != "longest":
        raise ValueError(f"--sizing {sizing!r}: use 'longest' (released inference) or 'area' (diffusers)")
    if resolution % 16 or resolution < 16:
        raise ValueError(f"--resolution {resolution}: must be a multiple of 16 (the model uses 640 or 1024)")
    scale = resolution / max(image.size)
    return tuple(max(16, int(side * scale) // 16 * 16) for side in image.size)


def prepare_images(pipe, images, resolution, sizing="longest"):
    """Resize (condition_size) and turn RGB into RGBA with alpha 1. Returns (pixels (n, 4, 1, H, W) in [-1, 1],
    resized RGB images, H, W). All images of one call must land on the same size (Layer-3D RoPE reads the
    first sample's shape only)."""
    if not images:
        raise ValueError("images: empty list; give at least one image")
    if not all(isinstance(im, Image.Image) for im in images):
        raise ValueError("images: every item must be a PIL.Image (use data.open_image for files)")
    sizes = {condition_size(im, resolution, sizing) for im in images}
    if len(sizes) > 1:
        raise ValueError(
            f"images resolve to different sizes {sorted(sizes)} at resolution {resolution}; "
            "sample them in separate calls"
        )
    ((width, height),) = sizes
    rgb = [pipe.image_processor.resize(to_rgb(im), height, width) for im in images]
    pixels = pipe.image_processor.preprocess([im.convert("RGBA") for im in rgb], height, width)
    return pixels.unsqueeze(2), rgb, height, width  # (n, 4, 1, H, W)


# ----------------------------------------------------------------------------- prompts
def encode_prompt(pipe, prompt):
    """(prompt_embeds (1, L, D), prompt_embeds_mask (1, L) or None), cached on the pipeline so the text
    encoder can be freed after the first call (see train.py)."""
    cache = pipe.__dict__.setdefault("_prompt_cache", {})
    if prompt not in cache:
        if pipe.text_encoder is None:
            raise RuntimeError(f"prompt {prompt!r} was not encoded before the text encoder was freed")
        with torch.no_grad():
            cache[prompt] = pipe.encode_prompt(prompt, device=pipe.text_encoder.device, max_sequence_length=512)
    return cache[prompt]


def free_text_encoder(pipe):
    """Drop the text encoder (16 GiB on the real model) once the fixed prompt is encoded and cached."""
    pipe.text_encoder = None
    if pipe.transformer.device.type == "cuda":
        torch.cuda.empty_cache()


def caption(pipe, image):
    """Auto-caption one image with the pipeline's Qwen2.5-VL (cached by pixel hash); needs the processor."""
    if pipe.processor is None:
        raise RuntimeError("auto-captioning needs the pipeline's processor: load_pipeline(..., captioning=True)")
    cache = pipe.__dict__.setdefault("_caption_cache", {})
    key = hashlib.sha1(image.tobytes()).hexdigest()
    if key not in cache:
        with torch.no_grad():
            cache[key] = pipe.get_image_caption(image, use_en_prompt=True, device=pipe.text_encoder.device)
    return cache[key]


# ----------------------------------------------------------------------------- the SDE step
def sde_step_with_logprob(
    velocity, latents, sigma, sigma_next, noise_level, prev_sample=None, generator=None, sde_type="sde"
):
    """One reverse step x_t -> x_{t-1} of Flow-GRPO and the log-density of the sample (all float32).

    Flow-GRPO (arXiv:2505.05470, "ODE to SDE"), with dt = sigma_next - sigma < 0, a = noise_level:
        std_dev_t   = a * sqrt(sigma / (1 - sigma'))      sigma' = sigma, or sigma_next where sigma == 1
        prev_mean   = x * (1 + std_dev_t^2 / (2 sigma) * dt) + v * (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) * dt
        prev_sample = prev_mean + std_dev_t * sqrt(-dt) * eps,   eps ~ N(0, I)
        log_prob    = MEAN over all non-batch dims of log N(prev_sample; prev_mean, (std_dev_t sqrt(-dt))^2)
    a = 0 is the plain Euler step x + v dt; its log_prob (a Dirac) is returned as 0.
    sde_type="cps" is the coefficients-preserving variant (CPS, "Coefficients-Preserving Sampling for RL with
    Flow Matching", Wang et al. 2025; the form used by upstream Flow-GRPO's code):
        s = sigma_next sin(a pi / 2), x0 = x - sigma v, x1 = x + (1 - sigma) v,
        prev_mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - s^2) x1, prev_sample = prev_mean + s eps,
        log_prob = -MEAN (prev_sample - prev_mean)^2   (unscaled, as upstream; std_dev_t returned = s)
    sigma, sigma_next: floats or (B,) tensors. Given prev_sample, that stored transition is re-scored.
    Returns (prev_sample, log_prob (B,), prev_mean, std_dev_t (B, 1, ..., 1)).
    """
    x, v = latents.float(), velocity.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(shape).expand(x.shape[0], *shape[1:])
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).reshape(shape).expand_as(sigma)
    dt = sigma_next - sigma
    dims = tuple(range(1, x.ndim))
    if sde_type == "sde":
        std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_next, sigma)))
        prev_mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        scale = std_dev_t * torch.sqrt(-dt)
    elif sde_type == "cps":
        std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
        x0, x1 = x - sigma * v, x + (1 - sigma) * v
        prev_mean = (1 - sigma_next) * x0 + torch.sqrt(sigma_next**2 - std_dev_t**2) * x1
        scale = std_dev_t
    else:
        raise ValueError(f"sde_type {sde_type!r}: use 'sde' or 'cps'")
    if prev_sample is None:
        eps = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = prev_mean + scale * eps
    prev_sample = prev_sample.float()
    if noise_level == 0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    elif sde_type == "cps":
        log_prob = -((prev_sample.detach() - prev_mean) ** 2).mean(dims)
    else:
        log_prob = (
            -((prev_sample.detach() - prev_mean) ** 2) / (2 * scale**2)
            - torch.log(scale)
            - 0.5 * math.log(2 * math.pi)
        ).mean(dims)
    return prev_sample, log_prob, prev_mean, std_dev_t


# ----------------------------------------------------------------------------- sampling
@dataclass
class Trajectory:
    """What one rollout hands to the GRPO update (B = number of images * group_size, rows grouped)."""

    latents: torch.Tensor  # (B, K+1, S, 64) float32: states before/after each of the K SDE steps of the window
    log_probs: torch.Tensor  # (B, K) float32: log p_old of each stored transition
    window: tuple  # (start, end): steps start..end-1 are SDE steps; all others ODE, nothing stored
    sigmas: torch.Tensor  # (T+1,) float32 schedule, last 0
    timesteps: torch.Tensor  # (T,) float32, sigmas[:-1] * 1000, as the scheduler gives them
    image_latents: torch.Tensor  # (B, S_c, 64) condition tokens, appended after the noise tokens
    prompt_embeds: torch.Tensor  # (B, L, D)
    prompt_embeds_mask: object  # (B, L) or None (None when no token is padding)
    negative_prompt_embeds: object  # (B, L', D) or None when CFG is off
    negative_prompt_embeds_mask: object
    layers: object  # (B, N, 4, H, W) float32 in [0, 1], layer 0 = background; None if not decoded
    images: list  # the n condition images (RGB, resized as the model saw them)
    num_layers: int
    height: int
    width: int
    group_size: int
    noise_level: float
    true_cfg_scale: float
    cfg_normalize: bool
    sde_type: str

    def img_shapes(self, batch):
        h, w = self.height // 16, self.width // 16
        return [[(1, h, w)] * (self.num_layers + 1) + [(1, h, w)]] * batch


def predict_velocity(transformer, traj, latents, t, rows=slice(None)):
    """v(x_t, t | image, prompt) for the given rows: the transformer on [noise tokens, condition tokens],
    sliced back to the noise tokens, with true CFG (and its optional per-token renormalisation) if on."""
    n = latents.shape[0]
    dtype = traj.image_latents.dtype
    x = torch.cat([latents.to(dtype), traj.image_latents[rows]], dim=1)
    timestep = t.expand(n).to(dtype) / 1000  # exactly as diffusers forms it
    common = dict(
        hidden_states=x,
        timestep=timestep,
        img_shapes=traj.img_shapes(n),
        attention_kwargs={},
        additional_t_cond=torch.zeros(n, dtype=torch.long, device=x.device),
        return_dict=False,
    )

    def mask(m):
        return None if m is None else m[rows]

    v = transformer(
        encoder_hidden_states=traj.prompt_embeds[rows],
        encoder_hidden_states_mask=mask(traj.prompt_embeds_mask),
        **common,
    )[0][:, : latents.shape[1]]
    if traj.negative_prompt_embeds is None:
        return v
    v_neg = transformer(
        encoder_hidden_states=traj.negative_prompt_embeds[rows],
        encoder_hidden_states_mask=mask(traj.negative_prompt_embeds_mask),
        **common,
    )[0][:, : latents.shape[1]]
    combined = v_neg + traj.true_cfg_scale * (v - v_neg)
    if traj.cfg_normalize:
        combined = combined * (v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    return combined


def _start(
    pipe,
    images,
    layers,
    group_size,
    num_inference_steps,
    resolution,
    prompt,
    true_cfg_scale,
    negative_prompt,
    cfg_normalize,
    generator,
    sizing="longest",
):
    """Everything before the denoising loop, as diffusers does it: condition latents, prompt embeddings,
    initial noise (B, (N+1) * h * w, 64) and the shifted schedule. Returns (trajectory skeleton, latents)."""
    if layers < 1:
        raise ValueError(f"layers={layers}: need at least 1")
    pixels, rgb, height, width = prepare_images(pipe, images, resolution, sizing)
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    batch = len(images) * group_size
    prompts = [caption(pipe, im) for im in rgb] if prompt is None else [prompt] * len(rgb)
    embeds = [encode_prompt(pipe, p) for p in prompts]
    if len({e.shape[1] for e, _ in embeds}) > 1:
        raise ValueError("per-image captions of different token lengths: sample those images in separate calls")
    neg, neg_mask = encode_prompt(pipe, negative_prompt) if true_cfg_scale > 1 else (None, None)

    def per_row(t):  # (n or 1, ...) -> (B, ...): rows i*G..i*G+G-1 belong to image i
        return None if t is None else t.to(device).repeat_interleave(batch // t.shape[0], 0)

    with torch.no_grad():
        image_latents = pipe._encode_vae_image(pixels.to(device, dtype), generator=None)  # (n, 16, 1, h, w)
        latents, image_latents = pipe.prepare_latents(
            per_row(image_latents),
            batch,
            pipe.transformer.config.in_channels // 4,
            height,
            width,
            layers,
            dtype,
            device,
            generator,
        )  # noise (B, (N+1) h w, 64), condition tokens (B, h w, 64)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    mu = (image_latents.shape[1] / 256) ** 0.5  # sqrt(condition tokens / 256): 2.5 at 640 px
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0, num_inference_steps + 1)[:-1], mu=mu, device=device)
    traj = Trajectory(
        latents=None,
        log_probs=None,
        window=(0, 0),
        sigmas=scheduler.sigmas,
        timesteps=scheduler.timesteps,
        image_latents=image_latents,
        prompt_embeds=per_row(torch.cat([e for e, _ in embeds]).to(dtype)),
        prompt_embeds_mask=None if embeds[0][1] is None else per_row(torch.cat([m for _, m in embeds])),
        negative_prompt_embeds=None if neg is None else per_row(neg.to(dtype)),
        negative_prompt_embeds_mask=per_row(neg_mask),
        layers=None,
        images=rgb,
        num_layers=layers,
        height=height,
        width=width,
        group_size=group_size,
        noise_level=0.0,
        true_cfg_scale=true_cfg_scale,
        cfg_normalize=cfg_normalize,
        sde_type="sde",
    )
    return traj, latents.float()


@torch.no_grad()
def sample(
    pipe,
    images,
    *,
    layers,
    group_size=1,
    num_inference_steps=10,
    noise_level=1.2,
    resolution=640,
    prompt=DEFAULT_PROMPT,
    true_cfg_scale=1.0,
    negative_prompt=" ",
    cfg_normalize=True,
    sde_window=None,
    sde_type="sde",
    generator=None,
    decode=True,
    progress=False,
    sizing="longest",
    decode_chunk=8,
):
    """Sample group_size candidate decompositions of each image with the Flow-GRPO SDE sampler.

    Steps sde_window = (start, end) (default: every step but the last, 0..T-2, as upstream) take
    sde_step_with_logprob and store their states and log-probs; the others are Euler (ODE) steps. The last step
    (sigma_next = 0) is never an SDE step: its CPS std is 0 (log-prob and KL undefined) and upstream never
    trains it. Each image is repeated group_size times with independent initial noise (rows i*G..i*G+G-1 are
    image i's group). prompt=None auto-captions each image. cfg_normalize (used when true_cfg_scale > 1)
    rescales the guided velocity to the conditional one's norm per token, as upstream's Qwen-Image trainer.
    Returns a Trajectory with layers (B, layers, 4, H, W) in [0, 1] if decode (decode_chunk frames at a time).
    """
    traj, x = _start(
        pipe,
        images,
        layers,
        group_size,
        num_inference_steps,
        resolution,
        prompt,
        true_cfg_scale,
        negative_prompt,
        cfg_normalize,
        generator,
        sizing,
    )
    last = num_inference_steps if noise_level == 0 else num_inference_steps - 1  # ODE windows may hold the last
    start, end = sde_window or (0, last)
    if not 0 <= start < end <= last:
        raise ValueError(
            f"sde_window {sde_window}: need 0 <= start < end <= {last} (num_inference_steps - 1: the "
            "last step, to sigma 0, is never an SDE step)"
        )
    traj.window, traj.noise_level, traj.sde_type = (start, end), float(noise_level), sde_type
    states, log_probs = [], []
    for i in tqdm(range(num_inference_steps), desc="denoise", leave=False, disable=not progress):
        v = predict_velocity(pipe.transformer, traj, x, traj.timesteps[i])
        sigma, sigma_next = traj.sigmas[i], traj.sigmas[i + 1]
        if start <= i < end:
            if i == start:
                states.append(x)
            x, log_prob, _, _ = sde_step_with_logprob(
                v, x, sigma, sigma_next, noise_level, generator=generator, sde_type=sde_type
            )
            states.append(x)
            log_probs.append(log_prob)
        else:
            x = x + (sigma_next - sigma) * v.float()  # Euler, as FlowMatchEulerDiscreteScheduler.step
    traj.latents = torch.stack(states, dim=1)  # (B, K+1, S, 64)
    traj.log_probs = torch.stack(log_probs, dim=1)  # (B, K)
    if decode:
        traj.layers = decode_layers(pipe, x, traj.height, traj.width, layers, decode_chunk)
    return traj


@torch.no_grad()
def decompose(
    pipe,
    images,
    *,
    layers,
    sampler="heun",
    num_inference_steps=50,
    resolution=640,
    true_cfg_scale=1.0,
    generator=None,
    prompt=DEFAULT_PROMPT,
    progress=False,
    sizing="longest",
):
    """Deterministic decomposition for evaluation: (B, layers, 4, H, W) in [0, 1].

    sampler="heun" is the released model's setting (2nd-order Heun on the same shifted schedule:
    x' = x + dt v(x, t); x <- x + dt (v(x, t) + v(x', t_next)) / 2, plain Euler on the last step to sigma=0);
    sampler="euler" is diffusers' own Euler loop (= sample(..., noise_level=0)).
    """
    if sampler == "euler":
        return sample(
            pipe,
            images,
            layers=layers,
            num_inference_steps=num_inference_steps,
            noise_level=0.0,
            resolution=resolution,
            prompt=prompt,
            true_cfg_scale=true_cfg_scale,
            generator=generator,
            sde_window=(0, 1),
            progress=progress,
            sizing=sizing,
        ).layers
    if sampler != "heun":
        raise ValueError(f"--sampler {sampler!r}: use 'heun' or 'euler'")
    traj, x = _start(
        pipe, images, layers, 1, num_inference_steps, resolution, prompt, true_cfg_scale, " ", True, generator, sizing
    )
    sig, ts = traj.sigmas, traj.timesteps
    for i in tqdm(range(num_inference_steps), desc="heun", leave=False, disable=not progress):
        dt = sig[i + 1] - sig[i]
        v = predict_velocity(pipe.transformer, traj, x, ts[i]).float()
        if sig[i + 1] > 0:
            v_next = predict_velocity(pipe.transformer, traj, x + dt * v, ts[i + 1]).float()
            v = (v + v_next) / 2
        x = x + dt * v
    return decode_layers(pipe, x, traj.height, traj.width, layers)


@torch.no_grad()
def decode_layers(pipe, latents, height, width, layers, chunk=8):
    """Packed latents (B, (N+1) h w, 64) -> RGBA layers (B, N, 4, H, W) in [0, 1]. Frame 0 (the composite)
    is dropped; frames are decoded `chunk` at a time to bound VAE memory, then regrouped per sample."""
    vae = pipe.vae
    x = pipe._unpack_latents(latents, height, width, layers, pipe.vae_scale_factor).to(vae.dtype)  # (B, C, N+1, h, w)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(x.device, x.dtype)
    x = x / inv_std + mean
    b, c, _, h, w = x.shape
    frames = x[:, :, 1:].permute(0, 2, 1, 3, 4).reshape(b * layers, c, 1, h, w)
    out = torch.cat([vae.decode(f, return_dict=False)[0][:, :, 0] for f in frames.split(chunk)])
    return (out.float() / 2 + 0.5).clamp(0, 1).reshape(b, layers, 4, out.shape[-2], out.shape[-1])


def step_log_prob(transformer, traj, j, rows=slice(None)):
    """Re-score stored transition j of the window (states j -> j+1) under the current transformer, with
    gradients: returns (log_prob (b,), prev_mean, std_dev_t) for the given rows."""
    i = traj.window[0] + j
    x = traj.latents[rows, j]
    v = predict_velocity(transformer, traj, x, traj.timesteps[i], rows)
    _, log_prob, prev_mean, std_dev_t = sde_step_with_logprob(
        v,
        x,
        traj.sigmas[i],
        traj.sigmas[i + 1],
        traj.noise_level,
        prev_sample=traj.latents[rows, j + 1],
        sde_type=traj.sde_type,
    )
    return log_prob, prev_mean, std_dev_t


# ----------------------------------------------------------------------------- files
def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="Sample G candidate layer decompositions per image (Flow-GRPO SDE sampler) "
        "and write them as RGBA PNGs: OUT/<image>/candidate_<k>/layer_<i>.png."
    )
    p.add_argument("--images", required=True, help="folder of input images (searched recursively)")
    add_model_flags(p)
    p.add_argument("--lora", default=None, help="optional LoRA: diffusers .safetensors (or folder) or PEFT folder")
    p.add_argument("--output_dir", default="outputs/rollout", help="where the PNGs go")
    p.add_argument("--layers", type=int, default=4, help="number of RGBA layers N")
    p.add_argument("--group_size", type=int, default=4, help="candidates per image G")
    p.add_argument("--num_inference_steps", type=int, default=10, help="denoising steps T")
    p.add_argument("--noise_level", type=float, default=1.2, help="SDE noise level a (0 = deterministic Euler)")
    p.add_argument(
        "--sde_window",
        type=int,
        nargs=2,
        default=None,
        metavar=("START", "END"),
        help="only steps START..END-1 are SDE (default 0..T-2: every step but the last)",
    )
    p.add_argument("--resolution", type=int, default=640, help="longest side in px: 640 (released) or 1024")
    p.add_argument(
        "--sizing",
        choices=["longest", "area"],
        default="longest",
        help="condition size: longest side = resolution, multiples of 16 (released inference), or diffusers' area "
        "rule (~resolution^2 px, x32)",
    )
    p.add_argument("--true_cfg_scale", type=float, default=1.0, help="true CFG scale; 1 = off (released setting)")
    p.add_argument(
        "--cfg_normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with CFG: rescale the guided velocity to the conditional norm per token (upstream)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.input_errors():  # bad input: one line, exit 2 (anything else keeps its traceback)
        device, dtype = cli.pick_device(args.device, args.mixed_precision)  # float32 on the CPU
        paths = find_images(args.images)
        cli.check_hub(args.pretrained_model_name_or_path, cli.flag_value(args, "pretrained_model_name_or_path"))
        quantize.check(args.quantize, device)
        pipe = load_pipeline(args.pretrained_model_name_or_path, torch_dtype=dtype, device=device, kind=args.quantize)
        if args.lora:
            load_lora(pipe, args.lora)
    speed_up(pipe.transformer, args.attention_backend, args.compile)
    generator = torch.Generator(device).manual_seed(args.seed)
    out = Path(args.output_dir)
    for path in tqdm(paths, desc="images"):
        traj = sample(
            pipe,
            [open_image(path)],
            layers=args.layers,
            group_size=args.group_size,
            generator=generator,
            num_inference_steps=args.num_inference_steps,
            noise_level=args.noise_level,
            sde_window=args.sde_window,
            resolution=args.resolution,
            true_cfg_scale=args.true_cfg_scale,
            cfg_normalize=args.cfg_normalize,
            sizing=args.sizing,
        )
        folder = out / path.relative_to(args.images).with_suffix("")
        folder.mkdir(parents=True, exist_ok=True)
        traj.images[0].save(folder / "image.png")
        for k, layers_k in enumerate(traj.layers):
            save_layers(layers_k, folder / f"candidate_{k:02d}")
    print(f"wrote {len(paths)} x {args.group_size} decompositions to {out}")


if __name__ == "__main__":
    main()
