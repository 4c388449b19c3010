"""Per-layer L1 of predicted layers against held-out reference layers, grouped by layer count L.

References and predictions use the reference format (support/images.py; one folder per sample: image.png and
layer_0.png ... layer_{L-1}.png, RGBA, layer_0 the background), predictions under the same sample names. Make
references with `python data.py synthetic refs` or `python data.py crello refs`.

    # score predictions of any method (no model loaded); several runs share one table
    python evaluate.py --references refs --predictions mine=preds_a --predictions theirs=preds_b --output_dir out
    # run the model: base, the released LoRA (PEFT folder) and an own LoRA (diffusers file), Heun 50 steps, 640 px
    python evaluate.py --references refs --base --lora stable=path/to/adapter \
        --lora mine=ckpt/pytorch_lora_weights.safetensors --output_dir out

Outputs in --output_dir: the printed table, results.json ({run: {str(L): {n, per_layer_l1, mean_l1, ...}}}),
layerd_scores.json (LayerD's protocol per edit level over all samples, support/layerd.py), per_sample.csv,
bars_L<L>.png (one bar chart per L comparing runs per layer index, and blank / duplicate / overlapping layers),
samples.png (input and layers on white, per run). Model mode also writes
output_dir/predictions/<run>/<sample>/layer_<i>.png for re-scoring. docs/evaluation.md defines every number.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import reward
import rollout
from support import cli, quantize
from support import layerd as layerd_protocol
from support.checkpoints import load_lora
from support.images import composite, list_references, load_layer_files, over_white, pil_to_rgba, save_layers
from support.report import bar_chart, format_table, side_by_side, write_csv


def resize_rgba(layer: torch.Tensor, size) -> torch.Tensor:
    """Resize (4, h, w) to size = (H, W): bilinear (align_corners=False, antialias=True, i.e. PIL's BILINEAR when
    shrinking) on premultiplied RGBA, then back to straight alpha (colour 0 where the new alpha is 0)."""
    if tuple(layer.shape[1:]) == tuple(size):
        return layer
    prem = torch.cat([layer[:3] * layer[3:], layer[3:]])[None]
    out = F.interpolate(prem, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    a = out[3:]
    return torch.cat([torch.where(a > 0, (out[:3] / a.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(a)), a])


# ------------------------------------------------------------------------------------------------------------- metrics
def to_uint8(layer: torch.Tensor) -> np.ndarray:
    """(4, H, W) in [0, 1] -> (H, W, 4) uint8, round(255 x): exactly the 8-bit file for layers read from PNGs."""
    return (layer.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def layer_quality(layers: torch.Tensor) -> dict:
    """The Stable-Layers paper's two other claims ("fewer blank or artifact-heavy layers", "stronger layer
    separation") measured on one stack (N, 4, H, W), back to front, extras included:
      blank_layers     = #{i: mean over H, W of alpha_i < 1e-3}
      duplicate_layers = #{non-blank j: some non-blank i < j has sum|P_i - P_j| / sum max(P_i, P_j) < 0.05}, P the
                         premultiplied RGBA (rgb * alpha, alpha), sums over channels and pixels
      (both exactly reward.layer_usage_reward's definitions, which it reads: one definition, in reward.py)
      fg_overlap       = sum_p (sum_{i>=1} a_i(p) - max_{i>=1} a_i(p)) / sum_p sum_{i>=1} a_i(p): the share of the
                         foreground layers' alpha that lies on another foreground layer's alpha; 0 when they are
                         disjoint or there are fewer than 2 (or no alpha), (K - 1) / K for K identical layers
    """
    if len(layers) == 0:
        return {"blank_layers": 0, "duplicate_layers": 0, "fg_overlap": 0.0}
    _, info = reward.layer_usage_reward([None], layers[None].float(), 1)  # B = 1: its means are this stack's counts
    fg = layers[1:, 3].double()  # (N - 1, H, W)
    total = fg.sum().item()
    overlap = (total - fg.amax(0).sum().item()) / total if len(fg) > 1 and total > 0 else 0.0
    return {
        "blank_layers": round(info["layer_usage/blank"]),
        "duplicate_layers": round(info["layer_usage/duplicate"]),
        "fg_overlap": overlap,
    }


def sample_metrics(
    ref_layers: torch.Tensor,
    ref_image: torch.Tensor,
    pred_layers: list,
    layerd: bool = True,
    layerd_max_edits: int = 5,
) -> dict:
    """All metrics of one sample; values in [0, 1].

    ref_layers (L, 4, H, W), ref_image (4, H, W) (image.png, alpha 1 when RGB), pred_layers a list of N (4, h, w);
    a prediction of another size is resized to (H, W) with `resize_rgba`.
      per_layer_l1[i]       = mean over H, W and the 3 channels of |over_white(pred_i) - over_white(ref_i)|
      per_layer_alpha_l1[i] = mean over H, W of |alpha(pred_i) - alpha(ref_i)|
      a missing pred layer (i >= N) is fully transparent (over white: all ones); pred layers i >= L are ignored
      here; missing_layers = max(L - N, 0), extra_layers = max(N - L, 0)
      mean_l1  = mean over i of per_layer_l1[i]
      recon_l1 = mean over H, W, 3 channels of |over_white(composite(all N pred layers, extras included))
                 - over_white(image.png)|
      blank_layers, duplicate_layers, fg_overlap: `layer_quality` of the N pred layers; ref_*: of the references
      layerd_levels: LayerD's protocol (layerd.edit_levels on the 8-bit layers, all N pred layers against
                 the L reference layers, up to layerd_max_edits merges), one dict per edit level; None when N < 2 or
                 L < 2 (LayerD's tools/evaluate.py skips those samples); layerd_rgb_l1, layerd_alpha_iou,
                 layerd_edits: its last level (the values at max edits, and the edits used)
    """
    L, _, H, W = ref_layers.shape
    resized = any(tuple(p.shape[1:]) != (H, W) for p in pred_layers)
    pred = torch.stack([resize_rgba(p, (H, W)) for p in pred_layers]) if pred_layers else ref_layers[:0]
    N = len(pred)
    used = torch.cat([pred[:L], torch.zeros(max(L - N, 0), 4, H, W)])  # (L, 4, H, W), missing = transparent
    per_layer = [(over_white(used[i]) - over_white(ref_layers[i])).abs().mean().item() for i in range(L)]
    per_alpha = [(used[i, 3] - ref_layers[i, 3]).abs().mean().item() for i in range(L)]
    recon = over_white(composite(pred)) if N else torch.ones(3, H, W)
    row = {
        "L": L,
        "num_pred_layers": N,
        "missing_layers": max(L - N, 0),
        "extra_layers": max(N - L, 0),
        "resized": resized,
        "per_layer_l1": per_layer,
        "per_layer_alpha_l1": per_alpha,
        "mean_l1": sum(per_layer) / L,
        "recon_l1": (recon - over_white(ref_image)).abs().mean().item(),
        **layer_quality(pred),
        **{f"ref_{k}": v for k, v in layer_quality(ref_layers).items()},
    }
    if layerd:
        levels = (
            layerd_protocol.edit_levels(
                [to_uint8(p) for p in pred], [to_uint8(r) for r in ref_layers], layerd_max_edits
            )
            if N >= 2 and L >= 2
            else None
        )
        last = levels[-1] if levels else {}
        row.update(
            layerd_levels=levels,
            layerd_rgb_l1=last.get("rgb_l1"),
            layerd_alpha_iou=last.get("alpha_iou"),
            layerd_edits=last.get("edits"),
        )
    return row


def score_predictions(
    references, predictions, layerd: bool = True, max_samples=None, run: str = "", layerd_max_edits: int = 5
) -> list:
    """Score predictions/<sample>/layer_<i>.png against every reference sample; one row (dict) per sample."""
    samples = list_references(references)[:max_samples]
    pred_root = Path(predictions)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"--predictions {pred_root}: no such folder")
    lacking = [p.name for p in samples if not (pred_root / p.name).is_dir()]
    if lacking:
        raise ValueError(
            f"--predictions {pred_root}: no folder for {len(lacking)} reference sample(s), e.g. "
            f"{lacking[0]}; an empty folder scores as all layers missing"
        )
    rows = []
    for folder in tqdm(samples, desc=f"scoring {run or pred_root.name}"):
        ref_layers = load_layer_files(folder, "reference")
        image = pil_to_rgba(Image.open(folder / "image.png"))
        if any(r.shape != ref_layers[0].shape for r in ref_layers) or image.shape[1:] != ref_layers[0].shape[1:]:
            raise ValueError(f"reference {folder}: image.png and the layer files must all have the same size")
        pred_layers = load_layer_files(pred_root / folder.name, "prediction")
        rows.append(
            {
                "run": run,
                "sample": folder.name,
                **sample_metrics(torch.stack(ref_layers), image, pred_layers, layerd, layerd_max_edits),
            }
        )
    return rows


def summarize(rows: list) -> dict:
    """Group rows by L: {str(L): {...}}. Means are over the n samples of the group (and per layer index);
    mean_l1 = mean over i of per_layer_l1[i]; per_layer_l1_std = sample std (ddof=1) over the n samples, 0 when n=1;
    missing_layers, extra_layers, pred_layers (= sum of N), blank_layers, duplicate_layers are sums over the group;
    blank_fraction = blank_layers / pred_layers, duplicate_fraction likewise (0 when no layer was predicted);
    fg_overlap = mean over the samples; ref_*: the same of the references (ref_pred_layers = n L);
    layerd = LayerD's aggregate (layerd.aggregate) of the layerd_n samples with LayerD levels, one dict per
    edit level; layerd_rgb_l1 / layerd_alpha_iou / layerd_edits = its last level's averages (None when none)."""
    out = {}
    for L in sorted({r["L"] for r in rows}):
        g = [r for r in rows if r["L"] == L]
        per = np.array([r["per_layer_l1"] for r in g])  # (n, L)
        alpha = np.array([r["per_layer_alpha_l1"] for r in g])  # (n, L)
        s = {
            "n": len(g),
            "per_layer_l1": per.mean(0).tolist(),
            "mean_l1": float(per.mean()),
            "per_layer_l1_std": (per.std(0, ddof=1) if len(g) > 1 else np.zeros(L)).tolist(),
            "per_layer_alpha_l1": alpha.mean(0).tolist(),
            "mean_alpha_l1": float(alpha.mean()),
            "recon_l1": float(np.mean([r["recon_l1"] for r in g])),
            "missing_layers": int(sum(r["missing_layers"] for r in g)),
            "extra_layers": int(sum(r["extra_layers"] for r in g)),
            "samples_resized": int(sum(r["resized"] for r in g)),
        }
        for pre, count in (("", sum(r["num_pred_layers"] for r in g)), ("ref_", len(g) * L)):
            blank, dup = (int(sum(r[f"{pre}{k}_layers"] for r in g)) for k in ("blank", "duplicate"))
            s.update(
                {
                    f"{pre}pred_layers": count,
                    f"{pre}blank_layers": blank,
                    f"{pre}duplicate_layers": dup,
                    f"{pre}blank_fraction": blank / count if count else 0.0,
                    f"{pre}duplicate_fraction": dup / count if count else 0.0,
                    f"{pre}fg_overlap": float(np.mean([r[f"{pre}fg_overlap"] for r in g])),
                }
            )
        levels = [r["layerd_levels"] for r in g if r.get("layerd_levels")]
        s["layerd"], s["layerd_n"] = layerd_protocol.aggregate(levels), len(levels)
        for key in ("rgb_l1", "alpha_iou", "edits"):
            s[f"layerd_{key}"] = s["layerd"][-1][f"avg_{key}"] if levels else None
        out[str(L)] = s
    return out


def evaluate(
    references,
    runs: dict,
    output_dir,
    layerd: bool = True,
    max_samples=None,
    num_examples: int = 4,
    layerd_max_edits: int = 5,
) -> dict:
    """Score each run {name: predictions folder}, write results.json, layerd_scores.json (LayerD's aggregate over all
    samples of each run, as LayerD's aggregated_scores.json), per_sample.csv, bars_L<L>.png, samples.png, print the
    table; return {run: {str(L): summary}}."""
    all_rows, results, layerd_all = [], {}, {}
    for name, pred_dir in runs.items():
        rows = score_predictions(references, pred_dir, layerd, max_samples, name, layerd_max_edits)
        results[name] = summarize(rows)
        layerd_all[name] = layerd_protocol.aggregate([r["layerd_levels"] for r in rows if r.get("layerd_levels")])
        all_rows += rows
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if layerd:
        (out / "layerd_scores.json").write_text(json.dumps(layerd_all, indent=2))
    write_csv(all_rows, out / "per_sample.csv")
    for L in sorted({r["L"] for r in all_rows}):
        bar_chart(results, L).save(out / f"bars_L{L}.png")
    first_of_L = {}
    for r in all_rows:
        first_of_L.setdefault(r["L"], r["sample"])
    picks = dict.fromkeys(list(first_of_L.values()) + [r["sample"] for r in all_rows])  # every L shown first
    side_by_side(references, runs, list(picks)[:num_examples]).save(out / "samples.png")
    print(format_table(results, layerd_all if layerd else None))
    return results


# --------------------------------------------- model mode: predictions from Qwen-Image-Layered (+ LoRA) via rollout.py
def predict_with_model(
    references,
    runs: dict,
    output_dir,
    pretrained_model_name_or_path: str,
    sampler: str = "heun",
    num_inference_steps: int = 50,
    resolution: int = 640,
    true_cfg_scale: float = 1.0,
    seed: int = 0,
    device=None,
    mixed_precision: str = "bf16",
    max_samples=None,
    sizing: str = "longest",
    kind: str = "none",
) -> dict:
    """Decompose every reference image with layers = its L, once per run {name: LoRA path or None (base)}.

    Writes output_dir/predictions/<run>/<sample>/layer_<i>.png (+ image.png, the input) and <run>/meta.json
    (settings, seconds per sample); returns {run: predictions folder}. Sample k uses torch.Generator().manual_seed(
    seed + k), so all runs see the same initial noise. device defaults to cuda when available, else cpu; the model
    dtype is mixed_precision (bf16 / fp16 / no = float32) on a GPU and float32 on cpu. A fresh pipeline is loaded
    for each run that follows a LoRA run (loading a LoRA cannot be undone in place for every format). kind: the
    base's blocks in int8 or nf4 (support/quantize.py), for cards the bf16 model does not fit.
    """
    samples = list_references(references)[:max_samples]
    for name, adapter in runs.items():  # check every path before loading a 40 GB model
        if adapter is not None and not os.path.exists(adapter):
            raise FileNotFoundError(f"--lora {name}={adapter}: no such file or folder")
    device, dtype = cli.pick_device(device, mixed_precision)
    quantize.check(kind, device)
    folders, pipe, dirty = {}, None, False
    for name, adapter in runs.items():
        if pipe is None or dirty:
            pipe = rollout.load_pipeline(pretrained_model_name_or_path, torch_dtype=dtype, device=device, kind=kind)
        if adapter is not None:
            load_lora(pipe, adapter, flag=f"--lora {name}=")
        dirty = adapter is not None
        root = Path(output_dir) / "predictions" / name
        seconds = []
        for k, folder in enumerate(tqdm(samples, desc=f"decomposing ({name})")):
            L = len(load_layer_files(folder, "reference"))
            image = Image.open(folder / "image.png").convert("RGB")
            start = time.perf_counter()
            layers = rollout.decompose(
                pipe,
                [image],
                layers=L,
                sampler=sampler,
                num_inference_steps=num_inference_steps,
                resolution=resolution,
                sizing=sizing,
                true_cfg_scale=true_cfg_scale,
                generator=torch.Generator().manual_seed(seed + k),
            )
            layers = layers.float().cpu()  # (1, L, 4, H, W); the copy waits for the GPU, so the time is complete
            seconds.append(time.perf_counter() - start)
            save_layers(layers[0], root / folder.name)
            image.save(root / folder.name / "image.png")
        meta = {
            "pretrained_model_name_or_path": pretrained_model_name_or_path,
            "lora": adapter,
            "sampler": sampler,
            "num_inference_steps": num_inference_steps,
            "resolution": resolution,
            "sizing": sizing,
            "true_cfg_scale": true_cfg_scale,
            "seed": seed,
            "device": device,
            "quantize": kind,
            "mixed_precision": mixed_precision if device != "cpu" else "no",  # what ran, not what was asked
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "seconds_per_sample": seconds,
        }
        (root / "meta.json").write_text(json.dumps(meta, indent=2))
        folders[name] = str(root)
    return folders


# -------------------------------------------------------------------------------------------------------- command line
def named(values, flag: str, default_name) -> dict:
    """[NAME=]PATH items -> {name: path}; a bare path is named by default_name(path); names must be unique."""
    out = {}
    for v in values or []:
        name, path = v.split("=", 1) if "=" in v and os.sep not in v.split("=", 1)[0] else (default_name(v), v)
        if not name or name in out:
            raise ValueError(f"{flag} {v}: run names must be unique and non-empty (use {flag} NAME=PATH)")
        out[name] = path
    return out


def _lora_name(path: str) -> str:
    p = Path(path.rstrip("/"))
    return p.parent.name if p.stem in ("pytorch_lora_weights", "adapter_model") else p.stem


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", help="reference folder: one subfolder per sample with image.png, layer_<i>.png")
    p.add_argument(
        "--predictions",
        action="append",
        metavar="[NAME=]DIR",
        help="score existing predictions (same folder format); repeatable; a bare DIR is named by its folder name",
    )
    rollout.add_model_flags(p, speed=False)
    p.add_argument(
        "--lora",
        action="append",
        metavar="[NAME=]PATH",
        help="model run with this LoRA: a diffusers pytorch_lora_weights.safetensors (or its folder) or a PEFT "
        "adapter folder; repeatable",
    )
    p.add_argument(
        "--base",
        action="store_true",
        help="also run the base model (implied when no --lora and no --predictions are given)",
    )
    p.add_argument("--sampler", default="heun", choices=["heun", "euler"], help="ODE sampler (released: heun)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps (released: 50)")
    p.add_argument("--resolution", type=int, default=640, help="longest side in px, 640 or 1024 (released: 640)")
    p.add_argument(
        "--sizing",
        choices=["longest", "area"],
        default="longest",
        help="condition size rule: longest side (released inference) or diffusers' area rule",
    )
    p.add_argument(
        "--true_cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (released: 1.0, off)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed: sample k of a model run uses seed + k")
    p.add_argument(
        "--output_dir",
        default="outputs/eval",
        help="where results.json, per_sample.csv, the PNGs and model predictions go",
    )
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N reference samples")
    p.add_argument("--num_examples", type=int, default=4, help="samples shown in samples.png")
    p.add_argument("--no_layerd", action="store_true", help="skip LayerD's protocol (RGB L1 / soft alpha IoU)")
    p.add_argument(
        "--layerd_max_edits",
        type=int,
        default=5,
        help="LayerD's max_edits: merges of adjacent layers allowed per sample, scores kept per level 0 .. max "
        "(LayerD's tools/evaluate.py --max-edits)",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.input_errors():
        if not args.references:
            raise cli.InputError("give --references DIR (make one with `python data.py synthetic DIR`)")
        if args.layerd_max_edits < 0:
            raise cli.InputError(f"--layerd_max_edits {args.layerd_max_edits}: give 0 or more (LayerD's default is 5)")
        run_dirs = named(args.predictions, "--predictions", lambda v: Path(v.rstrip("/")).name)
        model_runs = {"base": None} if args.base or not (args.lora or args.predictions) else {}
        model_runs.update(named(args.lora, "--lora", _lora_name))
        if set(model_runs) & set(run_dirs):
            raise cli.InputError(f"run names used twice: {sorted(set(model_runs) & set(run_dirs))}")
        if model_runs:
            cli.check_hub(args.pretrained_model_name_or_path, cli.flag_value(args, "pretrained_model_name_or_path"))
            run_dirs.update(
                predict_with_model(
                    args.references,
                    model_runs,
                    args.output_dir,
                    args.pretrained_model_name_or_path,
                    args.sampler,
                    args.num_inference_steps,
                    args.resolution,
                    args.true_cfg_scale,
                    args.seed,
                    args.device,
                    args.mixed_precision,
                    args.max_samples,
                    args.sizing,
                    args.quantize,
                )
            )
        evaluate(
            args.references,
            run_dirs,
            args.output_dir,
            not args.no_layerd,
            args.max_samples,
            args.num_examples,
            args.layerd_max_edits,
        )
        print(f"results in {args.output_dir}")


if __name__ == "__main__":
    main()
