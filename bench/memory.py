"""GPU memory of a train.py step: support/memory.py's plan for any flags, and the simulation that checks it.

    python -m bench.memory                             # the plan for train.py's defaults and each card class
    python -m bench.memory --quantize nf4 --rank 16 --train_batch_size 1 --group_size 4      # one set of flags
    python -m bench.memory --simulate --pretrained_model_name_or_path random:4   # simulated beside it, 4 blocks (CPU)

Its flags are train.py's, with train.py's defaults: paste a training command's flags to see its plan.

simulate() runs this project's own code (rollout.predict_velocity and the SDE step, rollout.decode_layers,
rollout.step_log_prob with gradients and gradient checkpointing, the KL reference, backward, AdamW) on 'meta' tensors,
which carry shapes and dtypes but no data, so the full 60-block model at 640 px costs no memory and no arithmetic,
and counts the bytes of every tensor storage alive after each operation (a TorchDispatchMode; a storage is freed
when the last tensor on it dies). Attention runs through the memory-efficient kernel's own op (output and
log-sum-exp, no N x N matrix), as flash or cuDNN attention does on a GPU. The quantized weights' bytes are counted,
not simulated: quantize.weight_bytes of one quantized block (built on the CPU) times the blocks. What it does not
see: the CUDA context, the caching allocator's rounding and fragmentation (reserved - allocated, taken as the ratio
RESERVED_OVERHEAD a GPU measured), and kernel workspaces.
"""

import argparse
import contextlib
import dataclasses
import types
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import grpo
import lora
import rollout
from support import cli, quantize, tiny
from support.memory import CARDS, GIB, RESERVED_OVERHEAD, D, Setup, counts, flag_text, meta_pipeline, plan

with quantize.quiet_imports():
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock


# ----------------------------------------------------------------------------- the simulation
class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive: a storage is counted when an operation first returns a tensor on
    it and uncounted when the last such tensor dies (autograd's saved tensors keep theirs alive). `peak` is the
    largest sum seen; `reset_peak()` starts a phase."""

    def __init__(self):
        super().__init__()
        self.live, self.total, self.peak = {}, 0, 0

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.total -= entry[0]
            del self.live[key]

    def track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = [storage.nbytes(), 0]
            self.total += storage.nbytes()
            self.peak = max(self.peak, self.total)
        self.live[key][1] += 1
        weakref.finalize(tensor, self._release, key)

    def reset_peak(self):
        self.peak = self.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@contextlib.contextmanager
def fused_attention():
    """scaled_dot_product_attention through the memory-efficient kernel's op, which meta tensors run as a GPU
    fused kernel would store (output + log-sum-exp); the plain SDPA would take the math path on 'meta'."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise ValueError("the simulation assumes no attention mask (every text token real), as Qwen-Image passes")
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, None, grad, is_causal=is_causal, scale=scale
        )[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def simulate(setup, dtype=torch.bfloat16):
    """Peak GiB allocated per phase of one full-size step (`setup`'s blocks), this code on meta tensors: resident
    (weights, VAE, LoRA + its autocast copy, AdamW's moments after the first step), rollout step (G candidates, no
    gradient, LoRA on), decode (G x L layers), update micro-step (B candidates: forward with checkpointing, the KL
    reference, backward). AdamW's moments, the fp32 LoRA and its fp32 gradients are counted, not simulated."""
    pipe = meta_pipeline(setup.num_blocks, dtype)
    transformer = pipe.transformer
    params = lora.add_lora(transformer, setup.rank, 2 * setup.rank)
    transformer.enable_gradient_checkpointing(
        lambda module, *a: torch.utils.checkpoint.checkpoint(
            module.__call__, *a, use_reentrant=False, preserve_rng_state=False
        )
    )  # no RNG state to keep on meta
    n_lora = sum(p.numel() for p in params)
    for p in params:  # meta runs no autocast: the LoRA runs in the model dtype, its fp32 bytes are added below
        p.data = p.data.to(dtype)
    frozen = [t for t in [*transformer.parameters(), *transformer.buffers()] if not t.requires_grad] + [
        *pipe.vae.parameters(),
        *pipe.vae.buffers(),
    ]
    resident = sum(t.numel() * t.element_size() for t in frozen) + n_lora * (4 + 8)  # fp32 LoRA, AdamW's 2 moments
    if setup.quantize != "none":  # counted, not simulated: one real block (zeros: the bytes do not depend on the
        # values), quantized, times the blocks
        with torch.device("meta"):
            block = QwenImageTransformerBlock(
                dim=D,
                num_attention_heads=tiny.FULL_TRANSFORMER["num_attention_heads"],
                attention_head_dim=tiny.FULL_TRANSFORMER["attention_head_dim"],
            )
        block = torch.nn.ModuleList([block.to_empty(device="cpu").to(dtype)])
        for p in block.parameters():
            p.data.zero_()
        before = sum(p.numel() * p.element_size() for p in block.parameters())
        quantize.quantize_blocks(types.SimpleNamespace(transformer_blocks=block), setup.quantize)
        resident -= (before - quantize.weight_bytes(block)) * setup.num_blocks
    in_flight = 0
    if (
        setup.shards > 1
    ):  # counted, not simulated: a rank holds 1/S of the blocks' linears and gathers 2 blocks at a time
        linear = counts(setup.num_blocks)[0] * torch.finfo(dtype).bits // 8
        resident, in_flight = resident - linear * (1 - 1 / setup.shards), 2 * linear / setup.num_blocks
    autocast_copy = n_lora * 2  # bf16 copies of the LoRA weights while autocast runs (rollout, decode, update)
    G, B, h = setup.group_size, setup.train_batch_size, setup.resolution // 16
    phases = {"resident": resident}
    mode = LiveBytes()
    with mode, fused_attention(), torch.device("meta"):
        traj = rollout.Trajectory(
            latents=None,
            log_probs=None,
            window=(0, 1),
            sigmas=torch.tensor([1.0, 0.9, 0.0]),
            timesteps=torch.tensor([1000.0, 900.0]),
            image_latents=torch.empty(G, h * h, 64, dtype=dtype),
            prompt_embeds=torch.empty(G, setup.text_tokens, 3584, dtype=dtype),
            prompt_embeds_mask=None,
            negative_prompt_embeds=None,
            negative_prompt_embeds_mask=None,
            layers=None,
            images=[],
            num_layers=setup.layers,
            height=setup.resolution,
            width=setup.resolution,
            group_size=G,
            noise_level=1.2,
            true_cfg_scale=1.0,
            cfg_normalize=False,
            sde_type="sde",
        )
        x = torch.empty(G, (setup.layers + 1) * h * h, 64)  # the sampler state, fp32
        mode.reset_peak()
        transformer.eval()
        with torch.no_grad():
            v = rollout.predict_velocity(transformer, traj, x, traj.timesteps[0])
            prev, old, _, _ = rollout.sde_step_with_logprob(v, x, traj.sigmas[0], traj.sigmas[1], 1.2)
        del v
        phases["rollout"] = resident + in_flight + autocast_copy + mode.peak
        mode.reset_peak()
        rollout.decode_layers(pipe, prev, setup.resolution, setup.resolution, setup.layers, setup.decode_chunk)
        phases["decode"] = resident + autocast_copy + mode.peak
        traj.latents, traj.log_probs = torch.stack([x, prev], 1)[:B], old[:B, None]
        traj.image_latents, traj.prompt_embeds = traj.image_latents[:B], traj.prompt_embeds[:B]
        del x, prev
        mode.reset_peak()
        transformer.train()
        log_prob, prev_mean, std_dev_t = rollout.step_log_prob(transformer, traj, 0)
        loss, _ = grpo.policy_loss(log_prob, traj.log_probs[:, 0], torch.ones(B), clip_range=1e-4)
        if setup.beta > 0:
            with torch.no_grad(), lora.reference_policy(transformer):
                _, ref_mean, _ = rollout.step_log_prob(transformer, traj, 0)
            loss = loss + setup.beta * grpo.kl_loss(prev_mean, ref_mean, std_dev_t)
        loss.backward()
        phases["update"] = resident + in_flight + autocast_copy + mode.peak + n_lora * 2  # + fp32 gradients' half
    return {k: v / GIB for k, v in phases.items()}


# ----------------------------------------------------------------------------- command line
def parse_args(argv=None):
    """train.py's flags that set a step's memory: the same names, forms and defaults."""
    p = cli.ArgumentParser(
        description="GPU memory of a train.py step by phase: the plan (arithmetic), the card "
        "classes' flag sets, and optionally the simulation (this code on meta tensors).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a(
        "--pretrained_model_name_or_path",
        default="Qwen/Qwen-Image-Layered",
        help="the released configuration (its hub id or a folder holding it: 60 blocks), or 'random:K' for K of its "
        "blocks, as train.py builds them",
    )
    a("--resolution", type=int, default=640, help="longest side of the condition image in px")
    a(
        "--layers",
        type=int,
        nargs="+",
        default=[4],
        help="layer count N, or the list train.py draws from (the largest sets the peak)",
    )
    a("--group_size", type=int, default=8, help="G: candidates per image (one rollout batch)")
    a("--train_batch_size", type=int, default=2, help="candidates per forward/backward when re-scoring")
    a("--rank", type=int, default=64, help="LoRA rank r")
    a("--quantize", default="none", choices=list(quantize.QUANTIZE), help="the frozen blocks in fewer bits")
    a("--beta", type=float, default=0.04, help="KL weight; 0 skips the reference forward")
    a("--decode_chunk", type=int, default=8, help="VAE frames decoded at a time after a rollout")
    a(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the frozen transformer sharded over --nproc_per_node ranks, as train.py --fsdp under torchrun; the "
        "plan is per GPU",
    )
    a("--nproc_per_node", type=int, default=2, help="with --fsdp: the ranks (GPUs) torchrun starts")
    a(
        "--simulate",
        action="store_true",
        help="also run simulate() for each row (this code on meta tensors: tens of seconds per row at 60 blocks on a "
        "CPU)",
    )
    args = p.parse_args(argv)
    model, _, blocks = args.pretrained_model_name_or_path.partition(":")
    checks = [
        (
            model != "tiny",
            "--pretrained_model_name_or_path tiny: the plan is for the released configuration; "
            "use random:K for K of its blocks",
        ),
        (
            not blocks or (model == "random" and blocks.isdigit() and 1 <= int(blocks) <= 60),
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: write random:K with K in 1..60",
        ),
        (args.resolution >= 16 and args.resolution % 16 == 0, "--resolution must be a positive multiple of 16"),
        (min(args.layers) >= 1, "--layers must be >= 1"),
        (args.group_size >= 2, "--group_size must be >= 2"),
        (
            min(args.train_batch_size, args.rank, args.decode_chunk) >= 1,
            "--train_batch_size, --rank and --decode_chunk must be >= 1",
        ),
        (args.beta >= 0, "--beta must be >= 0"),
        (not args.fsdp or args.nproc_per_node >= 2, "--fsdp shards over --nproc_per_node >= 2 ranks"),
        (not args.fsdp or args.quantize == "none", "--fsdp with --quantize: train.py refuses it (see --help)"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.num_blocks = int(blocks or 60)
    return args


def main(argv=None):
    args = parse_args(argv)
    setup = Setup(
        num_blocks=args.num_blocks,
        resolution=args.resolution,
        layers=max(args.layers),
        group_size=args.group_size,
        train_batch_size=args.train_batch_size,
        rank=args.rank,
        quantize=args.quantize,
        beta=args.beta,
        decode_chunk=args.decode_chunk,
        shards=args.nproc_per_node if args.fsdp else 1,
    )
    rows = [("these flags", setup)] + [
        (f"{card}: {flag_text(flags)}", dataclasses.replace(setup, **flags)) for card, (_, flags) in CARDS.items()
    ]
    print(
        f"GiB allocated at each phase's peak (plan{' / simulation' if args.simulate else ''}); reserved = peak x "
        f"{RESERVED_OVERHEAD}; judge elsewhere"
    )
    for name, row in rows:
        planned, simulated = plan(row), simulate(row) if args.simulate else None
        cells = [
            f"{k} {planned[k]:.1f}" + (f" / {simulated[k]:.1f}" if simulated and k in simulated else "")
            for k in ("resident", "rollout", "decode", "update")
        ]
        print(f"{name}\n    " + ", ".join(cells) + f"; reserved {planned['reserved']:.1f}")
    return rows


if __name__ == "__main__":
    main()
