"""Pictures of decompositions: a candidate's panel (the input and its RGBA layers on a checkerboard), a group's grid.

What the judge sees (reward.judge_queries sends these) and what a run's sample pictures show (`sample_picture`: the
grid captioned with each candidate's reward, advantage and the judge's scores).
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def on_checkerboard(layer: torch.Tensor, size, square: int) -> Image.Image:
    """(4, H, W) in [0, 1] -> RGB tile of `size`: resized premultiplied (so hidden colours do not bleed), then
    composited over a grey-and-white checkerboard drawn at the output size."""
    a = (layer.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    tile = Image.fromarray(a, "RGBA").convert("RGBa").resize(size, Image.BILINEAR).convert("RGBA")
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    board = Image.fromarray(np.where((yy // square + xx // square) % 2 == 0, 255, 204).astype(np.uint8), "L")
    return Image.alpha_composite(board.convert("RGBA"), tile).convert("RGB")


def render_candidate_panel(image, layers_k, label=None, caption=None, tile=256) -> Image.Image:
    """One candidate: the input image, then its N layers (N, 4, H, W) on a checkerboard, each titled;
    an optional big `label` on the left and `caption` text (may hold newlines) underneath."""
    n, _, h, w = layers_k.shape
    s = tile / max(h, w)
    tw, th = max(1, round(w * s)), max(1, round(h * s))
    pad, title_h = max(2, tile // 32), max(10, tile // 10)
    label_w = max(12, tile // 4) if label else 0
    lines = caption.splitlines() if caption else []
    cap_h = len(lines) * (title_h + 2) + (pad if lines else 0)
    panel = Image.new("RGB", (label_w + pad + (n + 1) * (tw + pad), pad + title_h + th + pad + cap_h), "white")
    draw, font = ImageDraw.Draw(panel), ImageFont.load_default(size=max(8, int(title_h * 0.8)))
    tiles = [image.convert("RGB").resize((tw, th), Image.BILINEAR)]
    tiles += [on_checkerboard(layers_k[i], (tw, th), max(2, tile // 32)) for i in range(n)]
    for i, t in enumerate(tiles):
        x = label_w + pad + i * (tw + pad)
        panel.paste(t, (x, pad + title_h))
        draw.text((x, pad), "input" if i == 0 else f"layer {i - 1}", fill="black", font=font)
    if label:
        draw.text(
            (label_w // 2, pad + title_h + th // 2),
            label,
            fill="black",
            anchor="mm",
            font=ImageFont.load_default(size=max(8, int(label_w * 0.9))),
        )
    for j, line in enumerate(lines):
        draw.text((label_w + pad, pad + title_h + th + pad + j * (title_h + 2)), line, fill="black", font=font)
    return panel


def render_group_grid(image, layers_group, labels, captions=None, tile=256, cols=None) -> Image.Image:
    """All G candidates (G, N, 4, H, W) as labelled panels in a grid, filled row by row in the given order.
    cols defaults to the count that makes the grid closest to square."""
    g = layers_group.shape[0]
    if len(labels) != g:
        raise ValueError(f"render_group_grid: {g} candidates but {len(labels)} labels")
    panels = [
        render_candidate_panel(image, layers_group[k], labels[k], captions[k] if captions else None, tile)
        for k in range(g)
    ]
    pw, ph = max(p.width for p in panels), max(p.height for p in panels)
    cols = cols or max(1, min(g, round(math.sqrt(g * ph / pw))))
    rows = math.ceil(g / cols)
    grid = Image.new("RGB", (cols * pw + (cols - 1) * 4, rows * ph + (rows - 1) * 4), (128, 128, 128))
    for k, p in enumerate(panels):
        grid.paste(p, ((k % cols) * (pw + 4), (k // cols) * (ph + 4)))
    return grid


def fit(img: Image.Image, max_side: int) -> Image.Image:
    s = max_side / max(img.size)
    return img if s >= 1 else img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)


def sample_picture(image, layers, rewards, advantages, candidates=()):
    """One scored group (G, N, 4, H, W) as a grid of labelled panels, each captioned with its reward r, advantage A
    and, for the VLM reward, the stage-1 total, the stage-2 score and each criterion's score (`candidates`: the
    reward's info["candidates"])."""
    captions = []
    for k, (r, a) in enumerate(zip(rewards.tolist(), advantages.tolist(), strict=True)):
        c = candidates[k] if k < len(candidates) else {}
        stages = [f"{n} {c[n]:.2f}" for n in ("stage1", "stage2") if isinstance(c.get(n), (int, float))]
        criteria = [f"{n[:5]} {v:.1f}" for n, v in (c.get("criteria") or {}).items() if v is not None]
        captions.append("  ".join([f"r {r:.3f}  A {a:+.2f}", *stages, *criteria]))
    return render_group_grid(image, layers, [chr(ord("A") + k) for k in range(len(rewards))], captions=captions)
