"""What a run saves: the LoRA in its two file formats, atomic checkpoints, exact resume, the final LoRA and its card.

- the LoRA's files: save_lora writes a diffusers pytorch_lora_weights.safetensors and a PEFT adapter folder peft/
  (the released Stable-Layers format); load_lora reads either, as a named adapter if asked;
- OUT/checkpoint-<step>/: the LoRA in both formats + training_state.pt ({step, optimizer, args}: tensors and plain
  Python types, so it loads with torch.load(weights_only=True)); written under a temporary name and renamed, so a
  kill never leaves a broken one. No RNG state is kept: every random draw of a step derives from (seed, step);
- resume: the LoRA and the optimizer back from a checkpoint, the metric rows after it dropped (those steps run again);
- the final LoRA at OUT/ with a model card (README.md) that huggingface_hub reads and `hf upload` publishes.
"""

import json
import os
import shutil
import urllib.parse
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support import quantize
from support.cli import InputError
from support.runfolder import checkpoints, last_metrics, row_step

with quantize.quiet_imports():
    from diffusers import QwenImageLayeredPipeline
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict


# ----------------------------------------------------------------------------- the LoRA's two file formats
@contextmanager
def quiet_peft():
    """Silence, where they arise, the two peft warnings that are noise here, and only those: that a LoRA on torchao
    int8 blocks (--quantize int8) cannot merge() / unmerge() (nothing here merges: the LoRA stays a separate adapter,
    saved alone), and that exclude_modules excluded nothing (a diffusers LoRA whose metadata lists exclusions beside
    the modules its weights name one by one: other tools write such files)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without", UserWarning)
        warnings.filterwarnings("ignore", "You have passed exclude_modules=.* no modules were excluded", UserWarning)
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)  # named adapters
        yield


def save_lora(transformer, folder, base_model):
    """Write the transformer's trained LoRA ("default") twice: pytorch_lora_weights.safetensors (diffusers'
    load_lora_weights) and peft/ (a PEFT adapter folder, loads like the released LoRA)."""
    folder = Path(folder)
    state = get_peft_model_state_dict(transformer, adapter_name="default", save_embedding_layers=False)
    config = transformer.peft_config["default"]
    config.base_model_name_or_path = base_model
    # diffusers builds its LoraConfig from this metadata (alpha included) but adapts the modules the weights name:
    # the metadata names those same modules, so that peft finds nothing to exclude and nothing missing to warn of
    metadata = {**config.to_dict(), "exclude_modules": None}
    metadata["target_modules"] = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    QwenImageLayeredPipeline.save_lora_weights(
        folder, transformer_lora_layers=state, safe_serialization=True, transformer_lora_adapter_metadata=metadata
    )
    (folder / "peft").mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder / "peft")
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
        folder / "peft" / "adapter_model.safetensors",
    )


def load_peft_weights(transformer, folder, adapter_name="default", flag="--lora"):
    """Copy a PEFT adapter folder's weights into the transformer's already-added adapter `adapter_name` (PeftModel
    saves its keys with a base_model.model. prefix). Raises ValueError if a key matches no LoRA module."""
    state = load_file(Path(folder) / "adapter_model.safetensors")
    incompatible = set_peft_model_state_dict(
        transformer, {k.removeprefix("base_model.model."): v for k, v in state.items()}, adapter_name=adapter_name
    )
    if getattr(incompatible, "unexpected_keys", None):
        raise ValueError(f"{flag} {folder}: keys that match no module: {incompatible.unexpected_keys[:3]}")


def load_lora(pipe, path, adapter_name="default", flag="--lora"):
    """Load a LoRA into pipe.transformer as adapter `adapter_name`, beside any others (one copy of the base weights):
    a diffusers LoRA (pytorch_lora_weights.safetensors, or a folder holding one) or a PEFT adapter folder
    (adapter_config.json + adapter_model.safetensors, the released Stable-Layers format). `flag` names the input
    in errors ("--lora", or "--teacher NAME=" to which the path is appended)."""
    path = Path(path)
    flag = flag if flag.endswith("=") else flag + " "
    if (path / "adapter_config.json").is_file():
        with quiet_peft():
            pipe.transformer.add_adapter(LoraConfig.from_pretrained(path), adapter_name=adapter_name)
        load_peft_weights(pipe.transformer, path, adapter_name, flag.rstrip())
        return
    if not (path.is_file() or (path / "pytorch_lora_weights.safetensors").is_file()):
        raise InputError(
            f"{flag}{path}: neither a diffusers LoRA (pytorch_lora_weights.safetensors) nor a PEFT adapter folder "
            "(adapter_config.json)"
        )
    file = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # with several adapters, diffusers lists the OTHERS' keys as "missing"
    try:
        with quiet_peft():
            pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    with safe_open(file, "pt") as f:
        expected = sum("lora_" in k for k in f.keys())
    found = sum(f".{adapter_name}." in n and "lora_" in n for n, _ in pipe.transformer.named_parameters())
    if found != expected:
        raise InputError(f"{flag}{path}: {expected - found} of its {expected} LoRA weights found no module")


# ----------------------------------------------------------------------------- checkpoints and resume
def save_checkpoint(
    output_dir, step, transformer, optimizer, args, limit, metrics=None, method="Flow-GRPO (Stable-Layers)"
):
    """output_dir/checkpoint-<step>/ (module docstring); older checkpoints beyond `limit` are removed. `metrics`: the
    step's row for the model card (default: the last row of metrics.jsonl)."""
    output_dir = Path(output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args)}, tmp / "training_state.pt")
    write_model_card(tmp, args, last_metrics(output_dir) if metrics is None else metrics, method=method)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    found = checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(old)
    return final


def saver(output_dir, transformer, optimizer, args, method="Flow-GRPO (Stable-Layers)"):
    """save(step, metrics=None): save_checkpoint for one run (--checkpoints_total_limit kept), as its loop and
    tracking.guard call it."""
    return lambda step, metrics=None: save_checkpoint(
        output_dir, step, transformer, optimizer, args, args.checkpoints_total_limit, metrics, method
    )


def load_checkpoint(path, output_dir, transformer, optimizer, writer=True):
    """Restore the LoRA and the optimizer from a checkpoint folder (or "latest" in output_dir; none there: step 0)
    and, if this process is the run's writer (rank 0), drop the metric rows logged after it (those steps run again).
    Returns the step to continue from."""
    output_dir, step = Path(output_dir), 0
    found = checkpoints(output_dir) if path == "latest" else [Path(path)]
    if found:
        path = found[-1]
        if not (path / "training_state.pt").is_file():
            raise InputError(f"--resume_from_checkpoint {path}: no training_state.pt there")
        load_peft_weights(transformer, path / "peft", flag="--resume_from_checkpoint")
        state = torch.load(path / "training_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    metrics = output_dir / "metrics.jsonl"
    if writer and metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if row_step(line) <= step]
        metrics.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(metrics.with_suffix(".tmp"), metrics)
    if writer:
        print(f"resumed from {path} at step {step}" if found else f"no checkpoint in {output_dir}: starting at step 0")
    return step


def save_final(output_dir, transformer, args, method="Flow-GRPO (Stable-Layers)"):
    """The final LoRA at output_dir (pytorch_lora_weights.safetensors, peft/) and its model card README.md, written
    to a temporary folder first and moved in item by item."""
    output_dir = Path(output_dir)
    tmp = output_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    samples = sorted((output_dir / "samples").glob("*.png"))
    sample = samples[-1].relative_to(output_dir).as_posix() if samples else None
    write_model_card(tmp, args, last_metrics(output_dir), sample=sample, method=method)
    for item in tmp.iterdir():
        shutil.rmtree(output_dir / item.name, ignore_errors=True)
        os.replace(item, output_dir / item.name)
    tmp.rmdir()


# ----------------------------------------------------------------------------- the model card
CARD_SETTINGS = [
    "reward", "reward_args", "judge", "judge_model", "judge_url", "group_size", "images_per_step",
    "num_inference_steps", "noise_level", "sde_type", "sde_window", "beta", "clip_range", "learning_rate", "rank",
    "lora_alpha", "resolution", "layers", "prompt", "max_train_steps", "seed", "synthetic", "data", "teacher",
    "weighting_scheme", "gradient_accumulation_steps", "init_lora", "quantize",
]  # fmt: skip
METHOD_TAGS = {"Flow-GRPO": "flow-grpo", "supervised": "sft", "on-policy distillation": "distillation"}


def _public(value):
    """A setting as it may appear in public: URLs lose their user:password@ part and query string."""
    if isinstance(value, str) and "://" in value:
        u = urllib.parse.urlsplit(value)
        return urllib.parse.urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else ""), u.path, "", ""))
    return value


def _how_to_load(base):
    if base == "tiny" or base.startswith("random"):  # built in code, not on the Hub
        return f"""The base `{base}` is built in code by the Stable-Layers repository (support/tiny.py), not
downloaded: in a clone of it,

```python
from support import tiny
from support.checkpoints import load_lora

pipe = tiny.{"tiny_pipeline()" if base == "tiny" else "released_pipeline()"}
load_lora(pipe, "path/to/this/folder")  # or pipe.load_lora_weights("path/to/this/folder")
```
"""
    return f"""```python
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
"""


def write_model_card(folder, args, metrics, sample=None, method="Flow-GRPO (Stable-Layers)"):
    """folder/README.md: a Hugging Face model card (huggingface_hub ModelCard) with metadata (base model, library,
    tags), the main settings, the last logged metrics, a sample picture and how to load the LoRA. Only the settings
    in CARD_SETTINGS appear (URLs stripped of credentials); no environment value is read."""
    from huggingface_hub import ModelCard, ModelCardData

    base = args.pretrained_model_name_or_path
    tag = next((t for prefix, t in METHOD_TAGS.items() if method.startswith(prefix)), "fine-tuning")
    data = ModelCardData(
        base_model=base,
        library_name="diffusers",
        license="apache-2.0",
        tags=["lora", "stable-layers", tag, "qwen-image-layered", "diffusers", "image-to-image"],
        pipeline_tag="image-to-image",
    )
    settings = {k: _public(getattr(args, k)) for k in CARD_SETTINGS if getattr(args, k, None) is not None}
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith(("time/", "mem/"))}
    rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in settings.items())
    last = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in shown.items()) or "| (no step logged yet) | |"
    picture = f"![a scored group at the last sample step]({sample})" if sample else ""
    body = f"""
# Stable-Layers LoRA for {base}

A LoRA for Qwen-Image-Layered (image -> RGBA layers), trained with {method} by the Stable-Layers reference
implementation, with no paired data.
{picture}

## Load it

{_how_to_load(base)}
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
