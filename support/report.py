"""evaluate.py's report: the table in the paper's shape, per-sample CSV, bar charts and the side-by-side picture.

Presentation only: every number comes from evaluate.py (its docstrings define them).
"""

import csv
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from support.images import composite, load_layer_files, pil_to_rgba, to_image

QUALITY = {"blank": "blank_fraction", "dup": "duplicate_fraction", "overlap": "fg_overlap"}  # column -> summary key


def format_table(results: dict, layerd_all: dict = None) -> str:
    """The paper's shape: one block per L with its n, columns Pred 0 .. Pred L-1 and mean, one row per run, then
    recon, the blank / duplicate fractions and the foreground overlap (a last row gives those of the references),
    and missing/extra layer counts. layerd_all {run: LayerD's aggregate over all samples} adds one block: RGB L1 and
    soft alpha IoU per max edits 0 .. the most used (a level no sample reached equals the last one)."""
    runs = list(results)
    width = max([len(r) for r in runs] + [12])
    lines = []
    for L in sorted({int(L) for r in runs for L in results[r]}):
        ns = {results[r][str(L)]["n"] for r in runs if str(L) in results[r]}
        head = "".join(f"{'Pred ' + str(i):>9}" for i in range(L)) + "".join(
            f"{c:>9}" for c in ["mean", "recon", *QUALITY]
        )
        lines += [f"L={L} (n={'/'.join(map(str, sorted(ns)))})".ljust(width) + head + "  miss/extra"]
        for r in runs:
            s = results[r].get(str(L))
            if s:
                vals = s["per_layer_l1"] + [s["mean_l1"], s["recon_l1"]] + [s[k] for k in QUALITY.values()]
                lines.append(
                    r.ljust(width)
                    + "".join(f"{v:9.4f}" for v in vals)
                    + f"  {s['missing_layers']}/{s['extra_layers']}"
                )
        s = next(results[r][str(L)] for r in runs if str(L) in results[r])
        lines += [
            "(reference)".ljust(width)
            + " " * 9 * (L + 2)
            + "".join(f"{s['ref_' + k]:9.4f}" for k in QUALITY.values()),
            "",
        ]
    for r, levels in (layerd_all or {}).items():
        skipped = sum(s["n"] - s["layerd_n"] for s in results[r].values())
        if levels:
            lines += [
                f"LayerD, {r}: n={levels[0]['count']}"
                + (f" ({skipped} with < 2 layers skipped)" if skipped else "")
                + f", mean edits used {levels[-1]['avg_edits']:.2f}",
                "".ljust(36) + "".join(f"{'edits<=' + str(x['max_edits']):>11}" for x in levels),
            ]
            lines += [
                f"  {name}".ljust(36) + "".join(f"{x[key]:11.4f}" for x in levels)
                for name, key in (
                    ("RGB L1 (lower is better)", "avg_rgb_l1"),
                    ("soft alpha IoU (higher is better)", "avg_alpha_iou"),
                )
            ]
    return "\n".join(lines)


def write_csv(rows: list, path) -> None:
    maxL = max(r["L"] for r in rows)
    keys = [
        "run",
        "sample",
        "L",
        "num_pred_layers",
        "missing_layers",
        "extra_layers",
        "resized",
        "mean_l1",
        "recon_l1",
        "blank_layers",
        "duplicate_layers",
        "fg_overlap",
        "ref_fg_overlap",
        "layerd_rgb_l1",
        "layerd_alpha_iou",
        "layerd_edits",
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + [f"l1_{i}" for i in range(maxL)] + [f"alpha_l1_{i}" for i in range(maxL)])
        for r in rows:
            pad = [""] * (maxL - r["L"])
            w.writerow(
                ["" if r.get(k) is None else r[k] for k in keys]
                + r["per_layer_l1"]
                + pad
                + r["per_layer_alpha_l1"]
                + pad
            )


PALETTE = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (155, 89, 182), (26, 188, 156)]


def _bars(d: ImageDraw.ImageDraw, left: int, groups: list, vals: list, title: str, font, bw=22, gap=26, plot_h=220):
    """One panel of grouped bars at x = left: vals[run][group], its own y axis from 0; returns its right edge."""
    top = max(max(v) for v in vals) * 1.15 or 1.0
    gw, y0 = bw * len(vals) + gap, 20 + plot_h
    right = left + gw * len(groups) + 10
    d.line([(left, 20), (left, y0), (right, y0)], fill="black")
    for t in range(5):  # y ticks
        y = y0 - plot_h * t / 4
        d.line([(left - 4, y), (left, y)], fill="black")
        d.text((left - 56, y - 7), f"{top * t / 4:.4f}", fill="black", font=font)
    for gi, name in enumerate(groups):
        x = left + gap / 2 + gi * gw
        for ri in range(len(vals)):
            h = plot_h * vals[ri][gi] / top
            d.rectangle([x + ri * bw, y0 - h, x + (ri + 1) * bw - 3, y0], fill=PALETTE[ri % len(PALETTE)])
        d.text((x, y0 + 5), name, fill="black", font=font)
    d.text((left, 3), title, fill="black", font=font)
    return right


def bar_chart(results: dict, L: int) -> Image.Image:
    """Two panels of grouped bars, one bar per run: per-layer L1 over white (one group per layer index, and the
    mean); then the blank and duplicate fractions of the predicted layers and the foreground overlap."""
    runs = [r for r in results if str(L) in results[r]]
    per = [results[r][str(L)] for r in runs]
    n_groups = L + 1 + len(QUALITY)
    img = Image.new("RGB", (150 + (22 * len(runs) + 26) * n_groups + 20, 290 + 16 * len(runs)), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(size=12)
    right = _bars(
        d,
        60,
        [f"Pred {i}" for i in range(L)] + ["mean"],
        [s["per_layer_l1"] + [s["mean_l1"]] for s in per],
        f"per-layer L1 over white, L={L} (n={per[0]['n']})",
        font,
    )
    _bars(
        d,
        right + 70,
        list(QUALITY),
        [[s[k] for k in QUALITY.values()] for s in per],
        "blank / duplicate layers (fraction), fg overlap",
        font,
    )
    for ri, r in enumerate(runs):  # legend
        y = 266 + 16 * ri
        d.rectangle([60, y, 72, y + 12], fill=PALETTE[ri % len(PALETTE)])
        d.text((78, y - 1), r, fill="black", font=font)
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
