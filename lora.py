"""The LoRA on Qwen-Image-Layered's transformer: which linears it adapts, its precision, its adapters, its files.

Shared by train.py (Flow-GRPO), sft.py (supervised), distill.py (teachers and student), evaluate.py and bench.py:
- add_lora: Flow-GRPO's Qwen-Image targets, gaussian init (B = 0: the policy starts as the base model), fp32
  weights (the optimizer's master copy); add_init_lora starts from a saved LoRA that is also the KL reference;
- lora_precision: the fp32 LoRA runs in the frozen weights' dtype under autocast, gradients stay fp32;
- named adapters (active_adapter, trainable_lora): a KL reference or distillation teachers beside the trained
  "default" adapter on one copy of the base weights;
- the files: save_lora writes a diffusers pytorch_lora_weights.safetensors and a PEFT adapter folder (the
  released Stable-Layers format); load_lora reads either; write_model_card describes them for the Hub.

    python -c "import lora, tiny; t = tiny.tiny_pipeline().transformer; print(sum(p.numel() for p in lora.add_lora(t, 4, 8)))"
"""

import json
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import quantize  # noqa: F401 (first: it keeps the quantization backends' import-time warnings quiet)
from diffusers import QwenImageLayeredPipeline

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
    get no gradient, checked in test_precision.py). Trainable weights in float32."""
    from peft import LoraConfig

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
    from peft import LoraConfig

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
            load_peft_weights(transformer, peft_dir, adapter_name=name)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"--init_lora {folder}: not a LoRA of this model ({str(e).splitlines()[0][:160]})")
    transformer.set_adapter("default")
    return trainable_lora(transformer)


@contextmanager
def quiet_peft():
    """Silence, where they arise, the two peft warnings that are noise here, and only those: that a LoRA on torchao
    int8 blocks (--quantize int8) cannot merge() / unmerge() (nothing here merges: the LoRA stays a separate adapter,
    saved alone), and that exclude_modules excluded nothing (a diffusers LoRA names its adapted modules one by one, so
    the exclusions saved with it have nothing left to exclude)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without", UserWarning)
        warnings.filterwarnings("ignore", "You have passed exclude_modules=.* no modules were excluded", UserWarning)
        yield


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
    from peft.helpers import disable_input_dtype_casting

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


def load_lora(pipe, path):
    """Load a LoRA into pipe.transformer: a diffusers LoRA (pytorch_lora_weights.safetensors, or a folder
    holding one) or a PEFT adapter folder (adapter_config.json + adapter_model.safetensors, the released
    Stable-Layers format)."""
    from peft import LoraConfig

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        with quiet_peft():
            pipe.transformer.add_adapter(LoraConfig.from_pretrained(path))
        load_peft_weights(pipe.transformer, path)
    elif path.is_file() or (path / "pytorch_lora_weights.safetensors").is_file():
        with quiet_peft():
            pipe.load_lora_weights(str(path))
    else:
        raise FileNotFoundError(
            f"--lora {path}: neither a diffusers LoRA (pytorch_lora_weights.safetensors) "
            "nor a PEFT adapter folder (adapter_config.json)"
        )


def load_peft_weights(transformer, folder, adapter_name="default"):
    """Copy a PEFT adapter folder's weights into the transformer's already-added adapter `adapter_name`
    (PeftModel saves its keys with a base_model.model. prefix). Raises ValueError if a key matches no LoRA
    module."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(Path(folder) / "adapter_model.safetensors")
    incompatible = set_peft_model_state_dict(
        transformer, {k.removeprefix("base_model.model."): v for k, v in state.items()}, adapter_name=adapter_name
    )
    if getattr(incompatible, "unexpected_keys", None):
        raise ValueError(f"--lora {folder}: keys that match no module: {incompatible.unexpected_keys[:3]}")


def save_lora(transformer, folder, base_model):
    """Write the transformer's active LoRA twice: pytorch_lora_weights.safetensors (diffusers'
    load_lora_weights) and peft/ (a PEFT adapter folder, loads like the released LoRA)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    state = get_peft_model_state_dict(transformer, save_embedding_layers=False)
    config = transformer.peft_config["default"]
    config.base_model_name_or_path = base_model
    QwenImageLayeredPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        safe_serialization=True,
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # keeps alpha
    (folder / "peft").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder / "peft")
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
        folder / "peft" / "adapter_model.safetensors",
    )


# ----------------------------------------------------------------------------- the model card
CARD_SETTINGS = [
    "reward",
    "judge",
    "judge_model",
    "judge_url",
    "group_size",
    "images_per_step",
    "num_inference_steps",
    "noise_level",
    "sde_type",
    "sde_window",
    "beta",
    "clip_range",
    "learning_rate",
    "rank",
    "lora_alpha",
    "resolution",
    "layers",
    "prompt",
    "max_train_steps",
    "seed",
    "synthetic",
    "data",
    "teacher",
    "weighting_scheme",
    "gradient_accumulation_steps",
    "init_lora",
    "quantize",
]


def _public(value):
    """A setting as it may appear in public: URLs lose their user:password@ part and query string."""
    if isinstance(value, str) and "://" in value:
        u = urllib.parse.urlsplit(value)
        return urllib.parse.urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else ""), u.path, "", ""))
    return value


def method_tag(method):
    """The Hub tag of a training method: flow-grpo (train.py), sft (sft.py), distillation (distill.py)."""
    return next(
        (
            tag
            for prefix, tag in (
                ("Flow-GRPO", "flow-grpo"),
                ("supervised", "sft"),
                ("on-policy distillation", "distillation"),
            )
            if method.startswith(prefix)
        ),
        "fine-tuning",
    )


def write_model_card(folder, args, metrics, sample=None, method="Flow-GRPO (Stable-Layers)"):
    """folder/README.md: a Hugging Face model card (huggingface_hub ModelCard) with metadata (base model,
    library, tags), the main settings, the last logged metrics, a sample picture and how to load the LoRA.
    Only the settings in CARD_SETTINGS appear (URLs stripped of credentials); no environment value is read."""
    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    data = ModelCardData(
        base_model=base,
        library_name="diffusers",
        license="apache-2.0",
        tags=["lora", "stable-layers", method_tag(method), "qwen-image-layered", "diffusers", "image-to-image"],
        pipeline_tag="image-to-image",
    )
    settings = {k: _public(getattr(args, k)) for k in CARD_SETTINGS if getattr(args, k, None) is not None}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "mem/"))}
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items())
    last = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in shown.items()) or "| (no step logged yet) | |"
    body = f"""
# Stable-Layers LoRA for {base}

A LoRA for Qwen-Image-Layered (image -> RGBA layers), trained with {method} by the Stable-Layers reference
implementation, with no paired data.
{f"![a scored group at the last sample step]({sample})" if sample else ""}

## Load it

```python
import torch
from diffusers import QwenImageLayeredPipeline

pipe = QwenImageLayeredPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors
```

or, as the released Stable-Layers inference does, the PEFT adapter in `peft/`:

```python
from peft import PeftModel
pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "path/to/this/folder/peft")
```

Released inference settings: Heun sampler, 50 steps, CFG off, 640 px longest side, 4 layers,
prompt "a clean, well composed image".

## Settings

| setting | value |
|---|---|
{rows}

## Last logged metrics (step {metrics.get("step", 0)})

| metric | value |
|---|---|
{last}
"""
    ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(Path(folder) / "README.md")
