"""evaluate.py: per-layer L1 of predicted layers against held-out reference layers, grouped by layer count L.

Reference format: one folder per sample holding image.png (the flattened design) and layer_0.png ... layer_{L-1}.png
(RGBA, straight alpha, layer_0 the background, back to front). L is the number of layer files. Predictions use the
same per-sample folder format, under the same sample names.

    # a balanced synthetic benchmark (L in {2, 3, 4}), or only its flattened images (training input / examples/)
    python evaluate.py --make_synthetic refs --num_samples 12 --seed 0
    python evaluate.py --make_synthetic examples --num_samples 6 --seed 0 --images_only
    # score predictions of any method (no model loaded); several runs share one table
    python evaluate.py --references refs --predictions mine=preds_a --predictions theirs=preds_b --output_dir out
    # run the model: base, the released LoRA (PEFT folder) and an own LoRA (diffusers file), Heun 50 steps, 640 px
    python evaluate.py --references refs --base --lora stable=path/to/adapter \
        --lora mine=ckpt/pytorch_lora_weights.safetensors --output_dir out
    # Crello designs with 2..4 layers (needs the optional `pip install datasets`)
    python evaluate.py --export_crello crello_refs --crello_split test

Outputs in --output_dir: the printed table, results.json ({run: {str(L): {n, per_layer_l1, mean_l1, ...}}}),
per_sample.csv, bars_L<L>.png (one bar chart per L comparing runs per layer index), samples.png (input and layers on
white, per run). Model mode also writes output_dir/predictions/<run>/<sample>/layer_<i>.png for re-scoring.
"""
import argparse
import csv
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from tqdm import tqdm

WORDS = ["SALE", "Summer", "Open Day", "Coffee", "Design", "Hello", "NEW", "50% OFF", "Workshop", "Music", "Travel",
         "Fresh", "Join us", "Studio", "Market", "Big News"]


# ----------------------------- synthetic layered designs (SynLayers: a scalable, L-balanced substitute for real layers)
def _smooth_field(rng, size, cells) -> np.ndarray:
    """Smooth random RGB texture in [0, 1], (H, W, 3): a cells x cells random grid upsampled bicubically."""
    grid = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(grid, "RGB").resize(size, Image.BICUBIC), dtype=np.float32) / 255.0


def _solid_layer(color, mask: Image.Image) -> Image.Image:
    """One-colour RGBA layer whose alpha is `mask` (mode L): clean straight alpha, no dark fringes."""
    return Image.merge("RGBA", [Image.new("L", mask.size, int(c)) for c in color] + [mask])


def _aa_mask(size, draw_fn, ss=2) -> Image.Image:
    """Antialiased mask: draw at ss x resolution with draw_fn(ImageDraw, scale) and downsample (box filter)."""
    big = Image.new("L", (size[0] * ss, size[1] * ss), 0)
    draw_fn(ImageDraw.Draw(big), ss)
    return big.resize(size, Image.BOX)


def _background(rng, size) -> Image.Image:
    W, H = size
    kind = rng.integers(3)
    if kind == 0:  # flat colour
        rgb = np.broadcast_to(rng.integers(0, 256, 3).astype(np.float32) / 255, (H, W, 3))
    elif kind == 1:  # linear gradient along a random direction
        c0, c1 = rng.random(3), rng.random(3)
        t = rng.random() * 2 * math.pi
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        s = (xx / max(W - 1, 1) - 0.5) * math.cos(t) + (yy / max(H - 1, 1) - 0.5) * math.sin(t)
        s = ((s - s.min()) / max(s.max() - s.min(), 1e-6))[..., None]
        rgb = c0 * (1 - s) + c1 * s
    else:  # noise texture: smooth colour field plus fine grain
        rgb = rng.random(3) * 0.7 + 0.15 + 0.25 * (_smooth_field(rng, size, int(rng.integers(3, 7))) - 0.5)
        rgb = rgb + 0.03 * rng.standard_normal((H, W, 3))
    rgba = np.concatenate([np.clip(rgb, 0, 1), np.ones((H, W, 1))], -1)
    return Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")


def _shapes(rng, size) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    for _ in range(int(rng.integers(1, 4))):
        w, h = rng.uniform(0.15, 0.45) * W, rng.uniform(0.15, 0.45) * H
        x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
        kind = int(rng.integers(4))
        def draw(d, s):
            b = [v * s for v in (x0, y0, x0 + w, y0 + h)]
            if kind == 0:
                d.rectangle(b, fill=255)
            elif kind == 1:
                d.rounded_rectangle(b, radius=min(b[2] - b[0], b[3] - b[1]) * 0.2, fill=255)
            elif kind == 2:
                d.ellipse(b, fill=255)
            else:
                d.polygon([((b[0] + b[2]) / 2, b[1]), (b[2], b[3]), (b[0], b[3])], fill=255)
        alpha = 1.0 if rng.random() < 0.7 else rng.uniform(0.6, 0.9)
        mask = _aa_mask(size, draw).point(lambda v: round(v * alpha))
        layer = Image.alpha_composite(layer, _solid_layer(rng.integers(0, 256, 3), mask))
    return layer


def _text(rng, size) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    color = rng.integers(0, 70, 3) if rng.random() < 0.5 else rng.integers(190, 256, 3)
    for _ in range(int(rng.integers(1, 3))):
        word = WORDS[int(rng.integers(len(WORDS)))]
        font = ImageFont.load_default(size=max(6, int(H * rng.uniform(0.07, 0.15))))
        mask = Image.new("L", size, 0)
        x0, y0, x1, y1 = ImageDraw.Draw(mask).textbbox((0, 0), word, font=font)
        x, y = rng.uniform(0, max(W - (x1 - x0), 1)) - x0, rng.uniform(0, max(H - (y1 - y0), 1)) - y0
        ImageDraw.Draw(mask).text((x, y), word, fill=255, font=font)
        layer = Image.alpha_composite(layer, _solid_layer(color, mask))
    return layer


def _cutout(rng, size) -> Image.Image:
    """Photo-like cut-out: smooth colour texture with lighting and grain, under an ellipse/blob mask with soft edges."""
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    light = 0.75 + 0.25 * (xx / max(W, 1) * rng.uniform(-1, 1) + yy / max(H, 1) * rng.uniform(-1, 1))
    palette = rng.random((3, 3))  # three colours mixed by a smooth field: a muted, photo-like texture
    weights = _smooth_field(rng, size, int(rng.integers(4, 9))) ** 3
    rgb = (weights / weights.sum(-1, keepdims=True)) @ palette
    rgb = rgb * light[..., None] + 0.03 * rng.standard_normal((H, W, 3))
    cx, cy = rng.uniform(0.25, 0.75) * W, rng.uniform(0.25, 0.75) * H
    rx, ry = rng.uniform(0.15, 0.3) * W, rng.uniform(0.15, 0.3) * H
    blobs = [(cx, cy, rx, ry)] + [(cx + rng.uniform(-rx, rx), cy + rng.uniform(-ry, ry), rx * rng.uniform(0.4, 0.8),
                                   ry * rng.uniform(0.4, 0.8)) for _ in range(int(rng.integers(0, 3)))]
    def draw(d, s):
        for bx, by, bw, bh in blobs:
            d.ellipse([(bx - bw) * s, (by - bh) * s, (bx + bw) * s, (by + bh) * s], fill=255)
    mask = _aa_mask(size, draw).filter(ImageFilter.GaussianBlur(radius=max(0.5, 0.015 * min(W, H))))
    rgba = np.concatenate([np.clip(rgb, 0, 1), np.asarray(mask, np.float32)[..., None] / 255], -1)
    return Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA")


def make_design(rng, num_layers: int, size=(640, 640)):
    """One synthetic layered design: (flattened RGB image, [num_layers RGBA layers], layer 0 opaque background).

    Foreground layers draw their kinds from {photo-like cut-out, shapes, text} without replacement (cycling when
    num_layers - 1 > 3) and are stacked in that order (cut-outs at the back, text on top, as in most designs). The
    image is the Porter-Duff "over" composite of the saved 8-bit layers, rounded to 8 bits, so image.png and the
    layers agree to 0.5/255.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if hasattr(rng, "getrandbits"):  # random.Random
        rng = np.random.default_rng(rng.getrandbits(63))
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")
    size = (int(size[0]), int(size[1]))
    kinds = []
    while len(kinds) < num_layers - 1:
        kinds += sorted(rng.permutation(3)[: num_layers - 1 - len(kinds)].tolist())
    layers = [_background(rng, size)] + [(_cutout, _shapes, _text)[k](rng, size) for k in kinds]
    return to_image(composite(torch.stack([pil_to_rgba(layer) for layer in layers]))), layers


def write_references(out_dir, num_samples: int = 12, seed: int = 0, size=(640, 640), layer_counts=(2, 3, 4),
                     images_only: bool = False) -> list:
    """Write num_samples designs in the reference format (out_dir/synth_<k>/), or with images_only just the flattened
    images (out_dir/synth_<k>.png). Sample k has L = layer_counts[k % len] (a balanced mix) and its own generator
    numpy.random.default_rng([seed, k]), so a sample does not depend on num_samples or images_only."""
    out = Path(out_dir)
    paths = []
    for k in tqdm(range(num_samples), desc="synthetic designs"):
        image, layers = make_design(np.random.default_rng([seed, k]), layer_counts[k % len(layer_counts)], size)
        if images_only:
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"synth_{k:04d}.png")
            paths.append(str(out / f"synth_{k:04d}.png"))
        else:
            paths.append(save_sample(out / f"synth_{k:04d}", image, layers))
    return paths


# ------------------ layers as tensors: (4, H, W) straight alpha in [0, 1]; a stack is (N, 4, H, W), layer 0 at the back
def pil_to_rgba(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def composite(layers: torch.Tensor) -> torch.Tensor:
    """Porter-Duff "over" from layer 0 upward, straight alpha in and out: (N, 4, H, W) -> (4, H, W).
    Premultiplied accumulation: C <- c_i a_i + C (1 - a_i), A <- a_i + A (1 - a_i); out = (C / A, A), 0 where A = 0."""
    C = torch.zeros_like(layers[0, :3])
    A = torch.zeros_like(layers[0, 3:])
    for layer in layers:
        a = layer[3:]
        C = layer[:3] * a + C * (1 - a)
        A = a + A * (1 - a)
    return torch.cat([torch.where(A > 0, C / A.clamp_min(1e-12), torch.zeros_like(C)), A])


def over_white(layer: torch.Tensor) -> torch.Tensor:
    """(4, H, W) straight RGBA -> (3, H, W) RGB composited over white: rgb * a + (1 - a)."""
    return layer[:3] * layer[3:] + (1 - layer[3:])


def to_image(layer: torch.Tensor) -> Image.Image:
    """(4, H, W) straight RGBA -> 8-bit RGB picture over white (round(255 * over_white))."""
    return Image.fromarray((over_white(layer) * 255).round().byte().permute(1, 2, 0).numpy(), "RGB")


def save_sample(folder: Path, image: Image.Image, layers: list) -> str:
    """One sample in the reference format: folder/image.png and folder/layer_<i>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / "image.png")
    for i, layer in enumerate(layers):
        layer.save(folder / f"layer_{i}.png")
    return str(folder)


def resize_rgba(layer: torch.Tensor, size) -> torch.Tensor:
    """Resize (4, h, w) to size = (H, W): bilinear (align_corners=False, antialias=True, i.e. PIL's BILINEAR when
    shrinking) on premultiplied RGBA, then back to straight alpha (colour 0 where the new alpha is 0)."""
    if tuple(layer.shape[1:]) == tuple(size):
        return layer
    prem = torch.cat([layer[:3] * layer[3:], layer[3:]])[None]
    out = F.interpolate(prem, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    a = out[3:]
    return torch.cat([torch.where(a > 0, (out[:3] / a.clamp_min(1e-12)).clamp(0, 1), torch.zeros_like(a)), a])


def load_layer_files(folder: Path, what: str) -> list:
    """layer_0.png ... layer_{k-1}.png of a folder as (4, H, W) tensors; the indices must run 0..k-1 without gaps."""
    idx = sorted(int(p.stem[6:]) for p in folder.glob("layer_*.png") if p.stem[6:].isdigit())
    if idx != list(range(len(idx))):
        raise ValueError(f"{what} {folder}: layer files must be layer_0.png .. layer_{{L-1}}.png without gaps, "
                         f"found indices {idx}")
    return [pil_to_rgba(Image.open(folder / f"layer_{i}.png")) for i in idx]


def list_references(references) -> list:
    root = Path(references)
    if not root.is_dir():
        raise FileNotFoundError(f"--references {root}: no such folder (make one with --make_synthetic or "
                                f"--export_crello)")
    samples = sorted(p for p in root.iterdir() if p.is_dir() and (p / "layer_0.png").exists())
    if not samples:
        raise ValueError(f"--references {root}: no sample folders holding layer_0.png (see the reference format "
                         f"in the docstring)")
    for p in samples:
        if not (p / "image.png").exists():
            raise ValueError(f"reference {p}: image.png is missing (the flattened design is needed for recon_l1)")
    return samples


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
                       seed: int = 0, device=None, mixed_precision: str = "bf16", max_samples=None) -> dict:
    """Decompose every reference image with layers = its L, once per run {name: LoRA path or None (base)}.

    Writes output_dir/predictions/<run>/<sample>/layer_<i>.png (+ image.png, the input) and <run>/meta.json
    (settings, seconds per sample); returns {run: predictions folder}. Sample k uses torch.Generator().manual_seed(
    seed + k), so all runs see the same initial noise. device defaults to cuda when available, else cpu; the model
    dtype is mixed_precision (bf16 / fp16 / no = float32) on a GPU and float32 on cpu. A fresh pipeline is loaded
    for each run that follows a LoRA run (loading a LoRA cannot be undone in place for every format).
    """
    import rollout  # lazy: predictions mode works without diffusers

    samples = list_references(references)[:max_samples]
    for name, lora in runs.items():  # check every path before loading a 40 GB model
        if lora is not None and not os.path.exists(lora):
            raise FileNotFoundError(f"--lora {name}={lora}: no such file or folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision] if device != "cpu" else None
    folders, pipe, dirty = {}, None, False
    for name, lora in runs.items():
        if pipe is None or dirty:
            pipe = rollout.load_pipeline(pretrained_model_name_or_path, torch_dtype=dtype, device=device)
        if lora is not None:
            rollout.load_lora(pipe, lora)
        dirty = lora is not None
        root = Path(output_dir) / "predictions" / name
        seconds = []
        for k, folder in enumerate(tqdm(samples, desc=f"decomposing ({name})")):
            L = len(load_layer_files(folder, "reference"))
            image = Image.open(folder / "image.png").convert("RGB")
            start = time.perf_counter()
            layers = rollout.decompose(pipe, [image], layers=L, sampler=sampler,
                                       num_inference_steps=num_inference_steps, resolution=resolution,
                                       true_cfg_scale=true_cfg_scale, generator=torch.Generator().manual_seed(seed + k))
            layers = layers.float().cpu()  # (1, L, 4, H, W); the copy waits for the GPU, so the time is complete
            seconds.append(time.perf_counter() - start)
            rollout.save_layers(layers[0], root / folder.name)
            image.save(root / folder.name / "image.png")
        meta = {"pretrained_model_name_or_path": pretrained_model_name_or_path, "lora": lora, "sampler": sampler,
                "num_inference_steps": num_inference_steps, "resolution": resolution, "true_cfg_scale": true_cfg_scale,
                "seed": seed, "device": device, "mixed_precision": mixed_precision, "seconds_per_sample": seconds}
        (root / "meta.json").write_text(json.dumps(meta, indent=2))
        folders[name] = str(root)
    return folders


# ---------------------------------------------------------------------- Crello exporter (optional dependency: datasets)
def elements_to_layers(elements: list, canvas_size, max_layers: int = 4) -> list:
    """Crello elements (back to front) -> at most max_layers RGBA layers (canvas_size = (W, H) pixels).

    Each element is a dict with image (PIL), left, top, width, height (pixels on the canvas), angle (radians,
    clockwise, about the element's centre) and opacity in [0, 1]. Rule: the element image is resized to
    (width, height), its alpha multiplied by opacity, rotated, and placed on a transparent canvas. Layer 0 is a white
    canvas with element 0 composited over it (the background layer is opaque, as the model's layer 0). The remaining
    E - 1 elements are cut, in order, into K = min(max_layers - 1, E - 1) contiguous groups of near-equal count (the
    first (E - 1) mod K groups one larger), each group composited into one layer. So a design yields 1 + K layers.
    """
    W, H = int(canvas_size[0]), int(canvas_size[1])
    blank = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    canvases = []
    for e in elements:
        w, h = max(1, round(e["width"])), max(1, round(e["height"]))
        el = e["image"].convert("RGBA").resize((w, h), Image.BILINEAR)
        el.putalpha(el.getchannel("A").point(lambda v, o=float(e.get("opacity", 1.0)): round(v * o)))
        cx, cy = e["left"] + e["width"] / 2, e["top"] + e["height"] / 2
        if e.get("angle", 0):
            el = el.rotate(-math.degrees(e["angle"]), resample=Image.BILINEAR, expand=True)
        x0, y0 = round(cx - el.width / 2), round(cy - el.height / 2)
        src = (max(0, -x0), max(0, -y0), min(el.width, W - x0), min(el.height, H - y0))  # part inside the canvas
        canvases.append(blank.copy())
        if src[2] > src[0] and src[3] > src[1]:
            canvases[-1].alpha_composite(el, dest=(max(0, x0), max(0, y0)), source=src)
    if not canvases:
        return []
    layers, rest = [Image.alpha_composite(Image.new("RGBA", (W, H), (255, 255, 255, 255)), canvases[0])], canvases[1:]
    K, start = min(max_layers - 1, len(rest)), 0
    for k in range(K):
        count = len(rest) // K + (k < len(rest) % K)
        layers.append(functools.reduce(Image.alpha_composite, rest[start:start + count], blank))
        start += count
    return layers


def crello_elements(example: dict, canvas_width: int, canvas_height: int, longest_side: int = 640):
    """One Crello example -> (element dicts for `elements_to_layers`, (W, H)), the canvas scaled so its longest side
    is longest_side. left/top/width/height are fractions of the canvas when every width and height of the design is
    <= 1 (older releases), else pixels; elements without an image are skipped."""
    s = longest_side / max(canvas_width, canvas_height)
    frac = all(v <= 1.0 for v in list(example["width"]) + list(example["height"]))
    sx, sy = (canvas_width * s, canvas_height * s) if frac else (s, s)
    elements = [{"image": img, "left": example["left"][i] * sx, "top": example["top"][i] * sy,
                 "width": example["width"][i] * sx, "height": example["height"][i] * sy,
                 "angle": example["angle"][i], "opacity": example["opacity"][i]}
                for i, img in enumerate(example["image"]) if img is not None]
    return elements, (round(canvas_width * s), round(canvas_height * s))


def export_crello(out_dir, split: str = "test", num_samples=None, min_layers: int = 2, max_layers: int = 4,
                  longest_side: int = 640, revision=None) -> list:
    """Write Crello (cyberagent/crello) designs that yield min_layers..max_layers layers (`crello_elements`, then
    `elements_to_layers`) in the reference format: out_dir/crello_<split>_<index>_<id>/."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("--export_crello needs the optional package `datasets`: pip install datasets") from err
    ds = datasets.load_dataset("cyberagent/crello", split=split, revision=revision)
    folders = []
    for idx, ex in enumerate(tqdm(ds, desc=f"crello {split}")):
        if num_samples is not None and len(folders) >= num_samples:
            break
        cw, ch = (int(ds.features[k].int2str(ex[k])) if hasattr(ds.features[k], "int2str") else int(ex[k])
                  for k in ("canvas_width", "canvas_height"))  # a class label in older releases
        layers = elements_to_layers(*crello_elements(ex, cw, ch, longest_side), max_layers)
        if min_layers <= len(layers) <= max_layers:
            image = to_image(composite(torch.stack([pil_to_rgba(x) for x in layers])))
            folders.append(save_sample(Path(out_dir) / f"crello_{split}_{idx:05d}_{ex['id']}", image, layers))
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


def _size(text: str):
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", help="reference folder: one subfolder per sample with image.png, layer_<i>.png")
    p.add_argument("--predictions", action="append", metavar="[NAME=]DIR",
                   help="score existing predictions (same folder format); repeatable; a bare DIR is named by its "
                        "folder name")
    p.add_argument("--pretrained_model_name_or_path", default="Qwen/Qwen-Image-Layered",
                   help="hub id or local folder of the pipeline for model mode ('tiny': a tiny random one, for tests)")
    p.add_argument("--lora", action="append", metavar="[NAME=]PATH",
                   help="model run with this LoRA: a diffusers pytorch_lora_weights.safetensors (or its folder) or a "
                        "PEFT adapter folder; repeatable")
    p.add_argument("--base", action="store_true", help="also run the base model (implied when no --lora and no "
                                                       "--predictions are given)")
    p.add_argument("--sampler", default="heun", choices=["heun", "euler"], help="ODE sampler (released: heun)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps (released: 50)")
    p.add_argument("--resolution", type=int, default=640, help="model resolution bucket, 640 or 1024 (released: 640)")
    p.add_argument("--true_cfg_scale", type=float, default=1.0,
                   help="classifier-free guidance scale (released: 1.0, off)")
    p.add_argument("--seed", type=int, default=0, help="seed: sample k of a model run uses seed + k; also the "
                                                       "synthetic generator's seed")
    p.add_argument("--device", default=None, help="device for model mode (default: cuda when available, else cpu)")
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"],
                   help="model dtype on a GPU (the CPU always runs float32)")
    p.add_argument("--output_dir", default="outputs/eval", help="where results.json, per_sample.csv, the PNGs and "
                                                                "model predictions go")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N reference samples")
    p.add_argument("--num_examples", type=int, default=4, help="samples shown in samples.png")
    p.add_argument("--no_layerd", action="store_true", help="skip LayerD's matched RGB L1 / soft alpha IoU")
    p.add_argument("--make_synthetic", metavar="DIR", help="write synthetic layered references to DIR and exit")
    p.add_argument("--images_only", action="store_true", help="with --make_synthetic: write only the flattened "
                                                              "images, DIR/synth_<k>.png")
    p.add_argument("--num_samples", type=int, default=None, help="synthetic designs to write (default 12) or Crello "
                                                                 "designs to export (default all)")
    p.add_argument("--size", type=_size, default=(640, 640), help="synthetic design size, W or WxH (default 640); for "
                                                                  "Crello the longest side")
    p.add_argument("--layer_counts", default="2,3,4", help="synthetic layer counts, cycled for a balanced mix")
    p.add_argument("--export_crello", metavar="DIR", help="export Crello designs with 2..4 layers to DIR and exit "
                                                          "(needs `pip install datasets`)")
    p.add_argument("--crello_split", default="test", help="Crello split to export")
    p.add_argument("--crello_revision", default=None, help="Crello dataset revision (default: latest)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        if args.make_synthetic:
            counts = tuple(int(c) for c in args.layer_counts.split(","))
            paths = write_references(args.make_synthetic, args.num_samples or 12, args.seed, args.size, counts,
                                     args.images_only)
            what = "images" if args.images_only else "samples"
            print(f"wrote {len(paths)} synthetic {what} to {args.make_synthetic}")
            return
        if args.export_crello:
            paths = export_crello(args.export_crello, args.crello_split, args.num_samples,
                                  longest_side=max(args.size), revision=args.crello_revision)
            print(f"wrote {len(paths)} Crello samples to {args.export_crello}")
            return
        if not args.references:
            raise ValueError("give --references DIR (or --make_synthetic DIR / --export_crello DIR)")
        runs = named(args.predictions, "--predictions", lambda v: Path(v.rstrip("/")).name)
        model_runs = {"base": None} if args.base or not (args.lora or args.predictions) else {}
        model_runs.update(named(args.lora, "--lora", _lora_name))
        if set(model_runs) & set(runs):
            raise ValueError(f"run names used twice: {sorted(set(model_runs) & set(runs))}")
        if model_runs:
            runs.update(predict_with_model(args.references, model_runs, args.output_dir,
                                           args.pretrained_model_name_or_path, args.sampler, args.num_inference_steps,
                                           args.resolution, args.true_cfg_scale, args.seed, args.device,
                                           args.mixed_precision, args.max_samples))
        evaluate(args.references, runs, args.output_dir, not args.no_layerd, args.max_samples, args.num_examples)
        print(f"results in {args.output_dir}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
