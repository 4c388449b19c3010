"""evaluate.py: per-layer L1 of predicted layers against held-out reference layers, grouped by layer count L.

References and predictions use the reference format of data.py (one folder per sample: image.png and
layer_0.png ... layer_{L-1}.png, RGBA, layer_0 the background), predictions under the same sample names. Make
references with `python data.py synthetic refs` or `python data.py crello refs`.

    # score predictions of any method (no model loaded); several runs share one table
    python evaluate.py --references refs --predictions mine=preds_a --predictions theirs=preds_b --output_dir out
    # run the model: base, the released LoRA (PEFT folder) and an own LoRA (diffusers file), Heun 50 steps, 640 px
    python evaluate.py --references refs --base --lora stable=path/to/adapter \
        --lora mine=ckpt/pytorch_lora_weights.safetensors --output_dir out

Outputs in --output_dir: the printed table, results.json ({run: {str(L): {n, per_layer_l1, mean_l1, ...}}}),
per_sample.csv, bars_L<L>.png (one bar chart per L comparing runs per layer index), samples.png (input and layers on
white, per run). Model mode also writes output_dir/predictions/<run>/<sample>/layer_<i>.png for re-scoring.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm import tqdm

from data import composite, list_references, load_layer_files, over_white, pil_to_rgba, save_layers, to_image
from quantize import QUANTIZE, check as check_quantize  # torch only: predictions mode needs no diffusers


def resize_rgba(layer: torch.Tensor, size) -> torch.Tensor:
    """Resize (4, h, w) to size = (H, W): bilinear (align_corners=False, antialias=True, i.e. PIL's BILINEAR when
    shrinking) on premultiplied RGBA, then back to straight alpha (colour 0 where the new alpha is 0)."""
    if tuple(layer.shape[1:]) == tuple(size):
        return layer
    prem = torch.cat([layer[:3] * layer[3:], layer[3:]])[None]
    out = F.interpolate(prem, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    a = out[3:]
    return torch.cat([torch.where(a > 0, (out[:3] / a.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(a)), a])


# -------------------------------------------------------------------------------------------------------------- metrics
def _layerd_pair(pred: torch.Tensor, ref: torch.Tensor):
    """LayerD-style pair metrics of two (4, H, W) layers: RGB L1 over the 3 straight colour channels of the pixels
    where ref alpha > 0 (0.0 when there are none), and soft alpha IoU = sum min(a_p, a_r) / sum max(a_p, a_r)
    (1.0 when both alphas are all zero)."""
    mask = ref[3] > 0
    rgb = (pred[:3] - ref[:3]).abs()[:, mask].mean().item() if mask.any() else 0.0
    hi = torch.maximum(pred[3], ref[3]).sum().item()
    iou = torch.minimum(pred[3], ref[3]).sum().item() / hi if hi > 0 else 1.0
    return rgb, iou


def layerd_metrics(pred: torch.Tensor, ref: torch.Tensor) -> dict:
    """Order-preserving matching with merges of adjacent layers, then LayerD's RGB L1 and soft alpha IoU.

    pred (N, 4, H, W) and ref (L, 4, H, W), both back to front. With N == L layer i is matched to layer i. Otherwise
    the longer sequence is cut into K = min(N, L) contiguous blocks (so exactly |N - L| merges, none on the shorter
    side), block k matched to layer k of the shorter one; a block is merged into one layer with `composite`. Among
    all such cuttings, dynamic programming picks the one with the least sum over pairs of d = (rgb_l1 + 1 - iou) / 2
    (metrics of `_layerd_pair`). Reported: layerd_rgb_l1 and layerd_alpha_iou = plain means over the K pairs,
    layerd_merges = |N - L|. Our own implementation of the idea of LayerD's protocol (which budgets merges as edit
    operations), not its code: comparable in kind with published numbers, not guaranteed identical.
    """
    N, L = len(pred), len(ref)
    if N == 0:
        return {"layerd_rgb_l1": None, "layerd_alpha_iou": None, "layerd_merges": None}
    long_, short, swap = (pred, ref, False) if N >= L else (ref, pred, True)
    M, K = len(long_), len(short)
    blocks = {(i, j): composite(long_[i:j]) for i in range(M) for j in range(i + 1, M - K + i + 2)}
    best = {(0, 0): (0.0, None, None)}  # (long layers used, short layers used) -> (cost, previous state, (rgb, iou))
    for k in range(K):
        for i in [i for (i, kk) in list(best) if kk == k]:
            for j in range(i + 1, M - (K - k - 1) + 1):  # leave at least one long layer per remaining short layer
                p, r = (short[k], blocks[i, j]) if swap else (blocks[i, j], short[k])
                rgb, iou = _layerd_pair(p, r)
                cost = best[i, k][0] + (rgb + 1 - iou) / 2
                if (j, k + 1) not in best or cost < best[j, k + 1][0]:
                    best[j, k + 1] = (cost, (i, k), (rgb, iou))
    pairs, state = [], (M, K)
    while state != (0, 0):
        _, state, pair = best[state]
        pairs.append(pair)
    return {"layerd_rgb_l1": sum(r for r, _ in pairs) / K, "layerd_alpha_iou": sum(u for _, u in pairs) / K,
            "layerd_merges": M - K}


def sample_metrics(ref_layers: torch.Tensor, ref_image: torch.Tensor, pred_layers: list, layerd: bool = True) -> dict:
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
      layerd_*: see `layerd_metrics` (all N pred layers against the L reference layers)
    """
    L, _, H, W = ref_layers.shape
    resized = any(tuple(p.shape[1:]) != (H, W) for p in pred_layers)
    pred = torch.stack([resize_rgba(p, (H, W)) for p in pred_layers]) if pred_layers else ref_layers[:0]
    N = len(pred)
    used = torch.cat([pred[:L], torch.zeros(max(L - N, 0), 4, H, W)])  # (L, 4, H, W), missing = transparent
    per_layer = [(over_white(used[i]) - over_white(ref_layers[i])).abs().mean().item() for i in range(L)]
    per_alpha = [(used[i, 3] - ref_layers[i, 3]).abs().mean().item() for i in range(L)]
    recon = over_white(composite(pred)) if N else torch.ones(3, H, W)
    row = {"L": L, "num_pred_layers": N, "missing_layers": max(L - N, 0), "extra_layers": max(N - L, 0),
           "resized": resized, "per_layer_l1": per_layer, "per_layer_alpha_l1": per_alpha,
           "mean_l1": sum(per_layer) / L, "recon_l1": (recon - over_white(ref_image)).abs().mean().item()}
    if layerd:
        row.update(layerd_metrics(pred, ref_layers))
    return row


def score_predictions(references, predictions, layerd: bool = True, max_samples=None, run: str = "") -> list:
    """Score predictions/<sample>/layer_<i>.png against every reference sample; one row (dict) per sample."""
    samples = list_references(references)[:max_samples]
    pred_root = Path(predictions)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"--predictions {pred_root}: no such folder")
    lacking = [p.name for p in samples if not (pred_root / p.name).is_dir()]
    if lacking:
        raise ValueError(f"--predictions {pred_root}: no folder for {len(lacking)} reference sample(s), e.g. "
                         f"{lacking[0]}; an empty folder scores as all layers missing")
    rows = []
    for folder in tqdm(samples, desc=f"scoring {run or pred_root.name}"):
        ref_layers = load_layer_files(folder, "reference")
        image = pil_to_rgba(Image.open(folder / "image.png"))
        if any(r.shape != ref_layers[0].shape for r in ref_layers) or image.shape[1:] != ref_layers[0].shape[1:]:
            raise ValueError(f"reference {folder}: image.png and the layer files must all have the same size")
        pred_layers = load_layer_files(pred_root / folder.name, "prediction")
        rows.append({"run": run, "sample": folder.name,
                     **sample_metrics(torch.stack(ref_layers), image, pred_layers, layerd)})
    return rows


def summarize(rows: list) -> dict:
    """Group rows by L: {str(L): {...}}. Means are over the n samples of the group (and per layer index);
    mean_l1 = mean over i of per_layer_l1[i]; per_layer_l1_std = sample std (ddof=1) over the n samples, 0 when n=1;
    missing_layers / extra_layers are sums over the group; layerd_* means skip samples without a value."""
    out = {}
    for L in sorted({r["L"] for r in rows}):
        g = [r for r in rows if r["L"] == L]
        per = np.array([r["per_layer_l1"] for r in g])  # (n, L)
        alpha = np.array([r["per_layer_alpha_l1"] for r in g])  # (n, L)
        s = {"n": len(g), "per_layer_l1": per.mean(0).tolist(), "mean_l1": float(per.mean()),
             "per_layer_l1_std": (per.std(0, ddof=1) if len(g) > 1 else np.zeros(L)).tolist(),
             "per_layer_alpha_l1": alpha.mean(0).tolist(), "mean_alpha_l1": float(alpha.mean()),
             "recon_l1": float(np.mean([r["recon_l1"] for r in g])),
             "missing_layers": int(sum(r["missing_layers"] for r in g)),
             "extra_layers": int(sum(r["extra_layers"] for r in g)),
             "samples_resized": int(sum(r["resized"] for r in g))}
        for key in ("layerd_rgb_l1", "layerd_alpha_iou"):
            vals = [r[key] for r in g if r.get(key) is not None]
            s[key] = float(np.mean(vals)) if vals else None
        out[str(L)] = s
    return out


# ---------------------------------------------------------------- reporting: table, JSON, CSV, bar charts, side-by-side
def format_table(results: dict) -> str:
    """The paper's shape: one block per L with its n, columns Pred 0 .. Pred L-1 and mean, one row per run
    (recon and missing/extra layer counts appended)."""
    runs = list(results)
    width = max([len(r) for r in runs] + [10])
    lines = []
    for L in sorted({int(L) for r in runs for L in results[r]}):
        ns = {results[r][str(L)]["n"] for r in runs if str(L) in results[r]}
        head = "".join(f"{'Pred ' + str(i):>9}" for i in range(L)) + f"{'mean':>9}{'recon':>9}  miss/extra"
        lines += [f"L={L} (n={'/'.join(map(str, sorted(ns)))})".ljust(width) + head]
        for r in runs:
            s = results[r].get(str(L))
            if s:
                vals = "".join(f"{v:9.4f}" for v in s["per_layer_l1"] + [s["mean_l1"], s["recon_l1"]])
                lines.append(r.ljust(width) + vals + f"  {s['missing_layers']}/{s['extra_layers']}")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list, path) -> None:
    maxL = max(r["L"] for r in rows)
    keys = ["run", "sample", "L", "num_pred_layers", "missing_layers", "extra_layers", "resized", "mean_l1",
            "recon_l1", "layerd_rgb_l1", "layerd_alpha_iou", "layerd_merges"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + [f"l1_{i}" for i in range(maxL)] + [f"alpha_l1_{i}" for i in range(maxL)])
        for r in rows:
            pad = [""] * (maxL - r["L"])
            w.writerow([r.get(k, "") for k in keys] + r["per_layer_l1"] + pad + r["per_layer_alpha_l1"] + pad)


PALETTE = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (155, 89, 182), (26, 188, 156)]


def bar_chart(results: dict, L: int) -> Image.Image:
    """Grouped bars: one group per layer index (and the mean), one bar per run, L1 on the y axis."""
    runs = [r for r in results if str(L) in results[r]]
    groups = [f"Pred {i}" for i in range(L)] + ["mean"]
    vals = [results[r][str(L)]["per_layer_l1"] + [results[r][str(L)]["mean_l1"]] for r in runs]
    top = max(max(v) for v in vals) * 1.15 or 1.0
    bw, gap, left, plot_h, font = 22, 26, 60, 220, ImageFont.load_default(size=12)
    gw = bw * len(runs) + gap
    img = Image.new("RGB", (left + gw * len(groups) + 20, plot_h + 70 + 16 * len(runs)), "white")
    d = ImageDraw.Draw(img)
    y0 = 20 + plot_h
    d.line([(left, 20), (left, y0), (img.width - 10, y0)], fill="black")
    for t in range(5):  # y ticks
        y = y0 - plot_h * t / 4
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((4, y - 7), f"{top * t / 4:.4f}", fill="black", font=font)
    for gi, name in enumerate(groups):
        x = left + gap / 2 + gi * gw
        for ri in range(len(runs)):
            h = plot_h * vals[ri][gi] / top
            d.rectangle([x + ri * bw, y0 - h, x + (ri + 1) * bw - 3, y0], fill=PALETTE[ri % len(PALETTE)])
        d.text((x, y0 + 5), name, fill="black", font=font)
    d.text((left, 3), f"per-layer L1 over white, L={L} (n={results[runs[0]][str(L)]['n']})", fill="black", font=font)
    for ri, r in enumerate(runs):  # legend
        y = y0 + 26 + 16 * ri
        d.rectangle([left, y, left + 12, y + 12], fill=PALETTE[ri % len(PALETTE)])
        d.text((left + 18, y - 1), r, fill="black", font=font)
    return img


def side_by_side(references, runs: dict, samples: list, tile: int = 128) -> Image.Image:
    """Rows per sample: the reference (image.png, then its layers over white), then each run (its composite over
    white, then its layers over white, extras included)."""
    font = ImageFont.load_default(size=12)
    rows = []
    for name in samples:
        ref = Path(references) / name
        rows.append((f"{name}\nreference", [pil_to_rgba(Image.open(ref / "image.png"))] + load_layer_files(ref, "")))
        for run, pred_dir in runs.items():
            layers = load_layer_files(Path(pred_dir) / name, "prediction")
            rows.append((run, [composite(torch.stack(layers)) if layers else torch.zeros(4, 1, 1)] + layers))
    cols = max(len(t) for _, t in rows)
    img = Image.new("RGB", (110 + cols * (tile + 4), len(rows) * (tile + 4)), "white")
    d = ImageDraw.Draw(img)
    for ri, (label, tiles) in enumerate(rows):
        d.multiline_text((4, ri * (tile + 4) + 4), label, fill="black", font=font)
        for ci, t in enumerate(tiles):
            rgb = ImageOps.contain(to_image(t), (tile, tile))
            x, y = 110 + ci * (tile + 4), ri * (tile + 4)
            img.paste(rgb, (x, y))
            d.rectangle([x - 1, y - 1, x + rgb.width, y + rgb.height], outline=(170, 170, 170))
    return img


def evaluate(references, runs: dict, output_dir, layerd: bool = True, max_samples=None, num_examples: int = 4) -> dict:
    """Score each run {name: predictions folder}, write results.json, per_sample.csv, bars_L<L>.png, samples.png,
    print the table; return {run: {str(L): summary}}."""
    all_rows, results = [], {}
    for name, pred_dir in runs.items():
        rows = score_predictions(references, pred_dir, layerd, max_samples, run=name)
        results[name] = summarize(rows)
        all_rows += rows
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_csv(all_rows, out / "per_sample.csv")
    for L in sorted({r["L"] for r in all_rows}):
        bar_chart(results, L).save(out / f"bars_L{L}.png")
    first_of_L = {}
    for r in all_rows:
        first_of_L.setdefault(r["L"], r["sample"])
    picks = dict.fromkeys(list(first_of_L.values()) + [r["sample"] for r in all_rows])  # every L shown first
    side_by_side(references, runs, list(picks)[:num_examples]).save(out / "samples.png")
    print(format_table(results))
    return results


# ---------------------------------------------- model mode: predictions from Qwen-Image-Layered (+ LoRA) via rollout.py
def predict_with_model(references, runs: dict, output_dir, pretrained_model_name_or_path: str, sampler: str = "heun",
                       num_inference_steps: int = 50, resolution: int = 640, true_cfg_scale: float = 1.0,
                       seed: int = 0, device=None, mixed_precision: str = "bf16", max_samples=None,
                       sizing: str = "longest", quantize: str = "none") -> dict:
    """Decompose every reference image with layers = its L, once per run {name: LoRA path or None (base)}.

    Writes output_dir/predictions/<run>/<sample>/layer_<i>.png (+ image.png, the input) and <run>/meta.json
    (settings, seconds per sample); returns {run: predictions folder}. Sample k uses torch.Generator().manual_seed(
    seed + k), so all runs see the same initial noise. device defaults to cuda when available, else cpu; the model
    dtype is mixed_precision (bf16 / fp16 / no = float32) on a GPU and float32 on cpu. A fresh pipeline is loaded
    for each run that follows a LoRA run (loading a LoRA cannot be undone in place for every format). quantize: the
    base's blocks in int8 or nf4 (quantize.py), for cards the bf16 model does not fit.
    """
    import lora  # lazy: predictions mode works without diffusers
    import rollout

    samples = list_references(references)[:max_samples]
    for name, adapter in runs.items():  # check every path before loading a 40 GB model
        if adapter is not None and not os.path.exists(adapter):
            raise FileNotFoundError(f"--lora {name}={adapter}: no such file or folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision] if device != "cpu" else None
    check_quantize(quantize, device)
    folders, pipe, dirty = {}, None, False
    for name, adapter in runs.items():
        if pipe is None or dirty:
            pipe = rollout.load_pipeline(pretrained_model_name_or_path, torch_dtype=dtype, device=device,
                                         quantize=quantize)
        if adapter is not None:
            lora.load_lora(pipe, adapter)
        dirty = adapter is not None
        root = Path(output_dir) / "predictions" / name
        seconds = []
        for k, folder in enumerate(tqdm(samples, desc=f"decomposing ({name})")):
            L = len(load_layer_files(folder, "reference"))
            image = Image.open(folder / "image.png").convert("RGB")
            start = time.perf_counter()
            layers = rollout.decompose(pipe, [image], layers=L, sampler=sampler,
                                       num_inference_steps=num_inference_steps, resolution=resolution, sizing=sizing,
                                       true_cfg_scale=true_cfg_scale, generator=torch.Generator().manual_seed(seed + k))
            layers = layers.float().cpu()  # (1, L, 4, H, W); the copy waits for the GPU, so the time is complete
            seconds.append(time.perf_counter() - start)
            save_layers(layers[0], root / folder.name)
            image.save(root / folder.name / "image.png")
        meta = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "lora": adapter, "sampler": sampler,
                "num_inference_steps": num_inference_steps, "resolution": resolution, "sizing": sizing,
                "true_cfg_scale": true_cfg_scale, "seed": seed, "device": device, "mixed_precision": mixed_precision,
                "quantize": quantize,
                "seconds_per_sample": seconds}
        (root / "meta.json").write_text(json.dumps(meta, indent=2))
        folders[name] = str(root)
    return folders


# --------------------------------------------------------------------------------------------------------- command line
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", help="reference folder: one subfolder per sample with image.png, layer_<i>.png")
    p.add_argument("--predictions", action="append", metavar="[NAME=]DIR",
                   help="score existing predictions (same folder format); repeatable; a bare DIR is named by its "
                        "folder name")
    p.add_argument("--pretrained_model_name_or_path", default="Qwen/Qwen-Image-Layered",
                   help="hub id or local folder of the pipeline for model mode ('tiny': a tiny random one, for tests; "
                        "'random[:K]': the released configuration with random weights, for timing)")
    p.add_argument("--lora", action="append", metavar="[NAME=]PATH",
                   help="model run with this LoRA: a diffusers pytorch_lora_weights.safetensors (or its folder) or a "
                        "PEFT adapter folder; repeatable")
    p.add_argument("--base", action="store_true", help="also run the base model (implied when no --lora and no "
                                                       "--predictions are given)")
    p.add_argument("--sampler", default="heun", choices=["heun", "euler"], help="ODE sampler (released: heun)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps (released: 50)")
    p.add_argument("--resolution", type=int, default=640, help="longest side in px, 640 or 1024 (released: 640)")
    p.add_argument("--sizing", choices=["longest", "area"], default="longest",
                   help="condition size rule: longest side (released inference) or diffusers' area rule")
    p.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="classifier-free guidance scale (released: 1.0, off)")
    p.add_argument("--seed", type=int, default=0, help="seed: sample k of a model run uses seed + k")
    p.add_argument("--device", default=None, help="device for model mode (default: cuda when available, else cpu)")
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"],
                   help="model dtype on a GPU (the CPU always runs float32)")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE), help="the base transformer's "
                   "blocks in int8 (torchao) or nf4 (bitsandbytes) for 48 / 24 GB cards (quantize.py)")
    p.add_argument("--output_dir", default="outputs/eval", help="where results.json, per_sample.csv, the PNGs and "
                                                                "model predictions go")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N reference samples")
    p.add_argument("--num_examples", type=int, default=4, help="samples shown in samples.png")
    p.add_argument("--no_layerd", action="store_true", help="skip LayerD's matched RGB L1 / soft alpha IoU")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if not args.references:
            raise ValueError("give --references DIR (make one with `python data.py synthetic DIR`)")
        runs = named(args.predictions, "--predictions", lambda v: Path(v.rstrip("/")).name)
        model_runs = {"base": None} if args.base or not (args.lora or args.predictions) else {}
        model_runs.update(named(args.lora, "--lora", _lora_name))
        if set(model_runs) & set(runs):
            raise ValueError(f"run names used twice: {sorted(set(model_runs) & set(runs))}")
        if model_runs:
            runs.update(predict_with_model(args.references, model_runs, args.output_dir,
                                           args.pretrained_model_name_or_path, args.sampler, args.num_inference_steps,
                                           args.resolution, args.true_cfg_scale, args.seed, args.device,
                                           args.mixed_precision, args.max_samples, args.sizing, args.quantize))
        evaluate(args.references, runs, args.output_dir, not args.no_layerd, args.max_samples, args.num_examples)
        print(f"results in {args.output_dir}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
