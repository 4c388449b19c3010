"""GPU memory of a train.py step, planned before the run: closed-form arithmetic from the architecture.

plan() gives the GiB allocated at each phase's peak (resident weights, a rollout step, the decode, an update
micro-step, a local judge) from the bytes per candidate and per token (hidden D = 3072, MLP 4D, N tokens per
candidate), so train.py's start-up check (check_run) costs nothing. Its constants were read off bench/memory.py's
simulation (this project's code run on 'meta' tensors), which tests/test_quantize.py checks it against on other
configurations; docs/performance.md sets both beside what a GPU measured.

    python -m bench.memory      # the plan for train.py's defaults and each card class
"""

import dataclasses
import functools

import torch

from support import quantize, tiny

with quantize.quiet_imports():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )

GIB = 2**30
RESERVED_OVERHEAD = 1.10  # reserved / allocated at the peaks a GPU measured (docs/performance.md)
CARDS = {  # card class -> (GiB a run may reserve, the flags that fit it; judge elsewhere)
    "80 GB (H100, A100 80GB)": (76, {}),
    "48 GB (L40S, A6000, RTX 6000 Ada)": (44, {"quantize": "int8"}),
    "24 GB (RTX 4090, 3090)": (
        22,
        {"quantize": "nf4", "rank": 16, "train_batch_size": 1, "group_size": 4, "decode_chunk": 2},
    ),
    "2 x 48 GB, bf16": (44, {"shards": 2}),
    "4 x 24 GB, bf16": (22, {"shards": 4, "rank": 16, "train_batch_size": 1, "group_size": 4, "decode_chunk": 2}),
}


@dataclasses.dataclass
class Setup:
    """What sets a step's memory: train.py's flags of the same names (layers: the largest of --layers), and the
    model: num_blocks (60, or K for --pretrained_model_name_or_path random:K), hidden width, prompt tokens."""

    num_blocks: int = 60
    resolution: int = 640
    layers: int = 4
    group_size: int = 8
    train_batch_size: int = 2
    rank: int = 64
    quantize: str = "none"
    beta: float = 0.04
    decode_chunk: int = 8
    text_tokens: int = 11  # the fixed prompt after the template's drop
    hidden: int = 3072  # the transformer's width: 3072 released (the tiny pipeline's is 32)
    shards: int = 1  # ranks the frozen transformer is sharded over (train.py --fsdp under torchrun), 1 = none

    @property
    def tokens(self):  # per candidate: L + 1 noise frames + the condition frame of (res/16)^2 tokens, + text
        return (self.layers + 2) * (self.resolution // 16) ** 2 + self.text_tokens


# ----------------------------------------------------------------------------- the plan
D = 3072  # the released transformer's hidden size
# bf16 tensors of D per candidate per token alive at a phase's peak, and the decoder's bytes per pixel and frame;
# read off simulate() at the defaults (60 blocks, 640 px, 4 layers, G 8, micro-batch 2, r 64) and checked against it
# on other sizes in test_quantize.py
ROLLOUT_C = 19.1  # inside a block, no gradient (the LoRA's transients included)
UPDATE_C = 31.3  # the last block's recompute and backward, with its LoRA's
UPDATE_FIXED = 0.3 * GIB  # ... and a part that does not grow with the micro-batch
CHECKPOINT_C = 0.88  # each block's checkpointed input (image and text streams)
DECODE_C = 3500  # bytes per output pixel per VAE frame at the decoder's peak
BYTES_PER_WEIGHT = {"none": 2.0, "int8": 1 + 5 / D, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}  # the blocks' linears:
# bf16; int8 + an fp32 scale and int8 zero point per output row (~ 1 / in_features); packed 4 bits + a uint8 absmax
# per 64 weights + an fp32 statistic per 256 absmax (double quantisation)


@functools.cache
def counts(num_blocks=60):
    """Parameters of the released configuration, counted from the modules (built on 'meta'): (the blocks' linear
    weights, every other transformer parameter and buffer, the VAE's)."""
    pipe = meta_pipeline(num_blocks, torch.bfloat16)
    linear = sum(
        m.weight.numel()
        for b in pipe.transformer.transformer_blocks
        for m in b.modules()
        if isinstance(m, torch.nn.Linear)
    )
    total = sum(t.numel() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
    return linear, total - linear, sum(t.numel() for t in [*pipe.vae.parameters(), *pipe.vae.buffers()])


def lora_parameters(rank, num_blocks=60, hidden=D):
    """n_lora = 2 r D (18 K - 7): per block 8 attention linears of D -> D and 4 MLP ones of D <-> 4D (36 r D), less
    the last block's text query, text attention output and text MLP (14 r D), which lora.add_lora leaves out."""
    return 2 * rank * hidden * (18 * num_blocks - 7)


def plan(setup, weight_bytes=None, judge_bytes=0):
    """GiB allocated at each phase's peak for `setup` (bf16 activations):
        resident = weights (weight_bytes if given, e.g. counted on the loaded model; else counts() x bytes per weight)
                   + 12 n_lora (fp32 LoRA, AdamW's two fp32 moments)
        rollout  = resident + 2 n_lora (autocast's bf16 LoRA copy) + ROLLOUT_C G N D 2
        decode   = resident + 2 n_lora + DECODE_C min(decode_chunk, G L) res^2
        update   = resident + 2 n_lora + 4 n_lora (fp32 gradients) + (K CHECKPOINT_C + UPDATE_C) B N D 2
                   + UPDATE_FIXED
        judge    = resident + judge_bytes (a local judge's weights while it scores; 0 for a judge elsewhere)
    with N = (L + 2) (res / 16)^2 + text tokens. "peak" is their max, "reserved" = peak x RESERVED_OVERHEAD.
    Sharded over S ranks (--fsdp): the blocks' weights / S, the root's whole (it stays gathered after the first
    forward), and in the rollout and the update + 2 blocks' weights gathered (the one running, the one prefetched);
    the LoRA is whole on every rank."""
    linear, other, vae = counts(setup.num_blocks)
    if weight_bytes is None:
        weight_bytes = linear * BYTES_PER_WEIGHT[setup.quantize] / setup.shards + 2 * (other + vae)
    in_flight = 2 * linear * BYTES_PER_WEIGHT[setup.quantize] / setup.num_blocks if setup.shards > 1 else 0
    n_lora = lora_parameters(setup.rank, setup.num_blocks, setup.hidden)
    token = setup.tokens * setup.hidden * 2  # bytes of one token's hidden state
    resident = weight_bytes + 12 * n_lora
    phases = {
        "resident": resident,
        "rollout": resident + in_flight + 2 * n_lora + ROLLOUT_C * setup.group_size * token,
        "decode": resident
        + 2 * n_lora
        + DECODE_C * min(setup.decode_chunk, setup.group_size * setup.layers) * setup.resolution**2,
        "update": resident
        + in_flight
        + 6 * n_lora
        + (setup.num_blocks * CHECKPOINT_C + UPDATE_C) * setup.train_batch_size * token
        + UPDATE_FIXED,
        "judge": resident + judge_bytes,
    }
    phases = {k: v / GIB for k, v in phases.items()}
    phases["peak"] = max(phases.values())
    phases["reserved"] = phases["peak"] * RESERVED_OVERHEAD
    return phases


def check(setup, device, weight_bytes, judge_bytes=0):
    """train.py's start-up check on CUDA: the plan for these flags against what `device` has for this run (its free
    memory plus what this process already holds). Returns the one line to print if it fits; raises ValueError
    (one line: the peak, the budget, the card classes' flag sets that fit) if it does not."""
    free, _ = torch.cuda.mem_get_info(device)
    budget = (free + torch.cuda.memory_reserved(device)) / GIB
    planned = plan(setup, weight_bytes, judge_bytes)
    phase = max(("rollout", "decode", "update", "judge"), key=planned.get)
    if planned["reserved"] <= budget:
        return (
            f"memory plan: ~{planned['reserved']:.1f} GiB reserved at the {phase} peak, of {budget:.1f} GiB on "
            f"{device} (python -m bench.memory for the phases)"
        )
    fits = fitting(setup, budget) or [("none of the card classes' flag sets", 0)]
    raise ValueError(
        f"memory plan: ~{planned['reserved']:.1f} GiB reserved at the {phase} peak, more than the "
        f"{budget:.1f} GiB {device} has for this run; what fits: "
        + "; ".join(f"{f} (~{r:.0f} GiB)" if r else f for f, r in fits)
        + " (a judge elsewhere; --no-memory_check runs anyway)"
    )


def check_run(args, pipe, params, judge=None, shards=1):
    """check() for train.py's run as loaded: its flags, the LoRA's real rank (--init_lora's may differ), the
    transformer's width, the prompt's tokens, the weights this process holds now (less the fp32 LoRA, which the
    plan counts) and, with --judge_offload, the local judge's weights while it scores; `shards`: the ranks --fsdp
    shards the frozen transformer over."""
    transformer, device = pipe.transformer, pipe.transformer.device
    setup = Setup(
        num_blocks=len(transformer.transformer_blocks),
        resolution=args.resolution,
        layers=max(args.layers),
        group_size=args.group_size,
        train_batch_size=args.train_batch_size,
        rank=transformer.peft_config["default"].r,
        quantize=args.quantize,
        beta=args.beta,
        decode_chunk=args.decode_chunk,
        hidden=transformer.inner_dim,
        text_tokens=max(
            (e.shape[1] for e, _ in pipe.__dict__.get("_prompt_cache", {}).values()), default=Setup.text_tokens
        ),
        shards=shards,
    )
    weight_bytes = torch.cuda.memory_allocated(device) - 4 * sum(p.numel() for p in params)
    if shards > 1:  # the root's shards are gathered for good at the first forward
        weight_bytes += 2 * counts(setup.num_blocks)[1] * (1 - 1 / shards)
    return check(setup, device, weight_bytes, judge.weight_bytes if judge and args.judge_offload else 0)


def fitting(setup, budget_gib):
    """The card classes' flag sets (CARDS), each applied on top of `setup`, whose planned reserved peak fits
    `budget_gib`: [(flags as command-line text, reserved GiB)]; their weights counted from the modules."""
    out = []
    for _, (_, flags) in CARDS.items():
        reserved = plan(dataclasses.replace(setup, **flags))["reserved"]
        if reserved <= budget_gib:
            out.append((flag_text(flags), reserved))
    return out


def flag_text(flags):
    flags = dict(flags)
    shards = f"torchrun --nproc_per_node {flags.pop('shards')} ... --fsdp" if "shards" in flags else ""
    return " ".join([shards] * bool(shards) + [f"--{k} {v}" for k, v in flags.items()]) or "the defaults"


def meta_pipeline(num_blocks, dtype):
    """The released configuration on 'meta' (no memory): the transformer, the VAE and a scheduler."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype (diffusers warns about a .to(dtype) cast)
    try:
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel(**{**tiny.FULL_TRANSFORMER, "num_layers": num_blocks})
            vae = AutoencoderKLQwenImage(**tiny.FULL_VAE)
    finally:
        torch.set_default_dtype(old)
    return QwenImageLayeredPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer,
    )
