"""The LoRA on Qwen-Image-Layered's transformer: which linears it adapts, its precision, its adapters.

Shared by train.py (Flow-GRPO), sft.py (supervised), distill.py (teachers and student) and bench:
- add_lora: Flow-GRPO's Qwen-Image targets, gaussian init (B = 0: the policy starts as the base model), fp32
  weights (the optimizer's master copy); add_init_lora starts from a saved LoRA that is also the KL reference;
- lora_precision: the fp32 LoRA runs in the frozen weights' dtype under autocast, gradients stay fp32;
- named adapters (active_adapter, trainable_lora): the KL reference (reference_policy) or distillation teachers
  beside the trained "default" adapter, on one copy of the base weights.
Its two file formats (diffusers and PEFT) are written and read by support/checkpoints.py.

    python -c "import lora; from support import tiny; t = tiny.tiny_pipeline().transformer; \\
        print(sum(p.numel() for p in lora.add_lora(t, 4, 8)))"
"""

from contextlib import contextmanager
from pathlib import Path

import torch

from support import quantize
from support.checkpoints import load_peft_weights, quiet_peft

with quantize.quiet_imports():
    from peft import LoraConfig
    from peft.helpers import disable_input_dtype_casting

LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
# the last block's text output is discarded, so these modules of it would get no gradient
UNUSED_IN_LAST_BLOCK = ["attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def add_lora(transformer, rank, lora_alpha):
    """LoRA on the attention and MLP projections of every block (Flow-GRPO's Qwen-Image targets), gaussian
    init (B = 0: the policy starts as the reference); the last block's text-stream output modules are left
    out: the text queries, the text attention output and the text MLP, whose output is discarded (they would
    get no gradient, checked in tests/test_precision.py). Trainable weights in float32."""
    last = len(transformer.transformer_blocks) - 1
    transformer.requires_grad_(False)
    excluded = [f"transformer_blocks.{last}.{m}" for m in UNUSED_IN_LAST_BLOCK]
    with quiet_peft():
        transformer.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=lora_alpha,
                init_lora_weights="gaussian",
                target_modules=LORA_TARGETS,
                exclude_modules=excluded,
            )
        )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def add_init_lora(transformer, folder):
    """Start from a saved LoRA: its PEFT adapter (folder/peft or folder itself) becomes the trained adapter
    "default" and, frozen, the KL reference "reference". Returns the trainable fp32 parameters."""
    folder = Path(folder)
    peft_dir = folder / "peft" if (folder / "peft" / "adapter_config.json").is_file() else folder
    if not (peft_dir / "adapter_config.json").is_file():
        raise ValueError(
            f"--init_lora {folder}: no PEFT adapter there (looked for adapter_config.json in "
            f"{folder} and {folder / 'peft'}; found {sorted(p.name for p in folder.glob('*'))[:6]})"
        )
    transformer.requires_grad_(False)
    for name in ("default", "reference"):
        with quiet_peft():
            transformer.add_adapter(LoraConfig.from_pretrained(peft_dir), adapter_name=name)
        try:
            load_peft_weights(transformer, peft_dir, adapter_name=name, flag="--init_lora")
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"--init_lora {folder}: not a LoRA of this model ({str(e).splitlines()[0][:160]})"
            ) from None
    transformer.set_adapter("default")
    return trainable_lora(transformer)


def trainable_lora(transformer, name="default"):
    """Make adapter `name`'s LoRA weights the only trainable parameters, in float32 (the optimizer's master
    copy), and return them; other adapters (a KL reference, distillation teachers) stay frozen."""
    params = []
    for n, p in transformer.named_parameters():
        p.requires_grad_(f".{name}." in n and "lora_" in n)
        if p.requires_grad:
            p.data = p.data.float()
            params.append(p)
    return params


@contextmanager
def lora_precision(transformer):
    """Frozen bf16/fp16 weights with fp32 LoRA weights (the optimizer's master copy): run the LoRA matmuls in
    the model dtype under autocast, instead of peft's default of upcasting every adapted layer's input to
    fp32, which is slower and holds twice the transient activations (docs/performance.md has bench.py's figures).
    Gradients still reach the fp32 weights. A no-op for an fp32 model (the CPU tests)."""
    if transformer.dtype == torch.float32:
        yield
        return
    with torch.autocast(transformer.device.type, dtype=transformer.dtype), disable_input_dtype_casting(transformer):
        yield


@contextmanager
def active_adapter(transformer, name):
    """Run the block with adapter `name` active, then make the trained adapter ("default") active again."""
    transformer.set_adapter(name)
    try:
        yield
    finally:
        transformer.set_adapter("default")


@contextmanager
def reference_policy(transformer):
    """The KL reference: the same transformer with its LoRA disabled (no second copy of the weights), or the
    frozen --init_lora adapter when training started from one."""
    if "reference" in getattr(transformer, "peft_config", {}):
        with active_adapter(transformer, "reference"):
            yield
        return
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
