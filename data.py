"""Data: layered references made from synthetic designs or exported from Crello, and training images.

Evaluation reads layered references, one folder per sample: image.png (the flattened design) and layer_0.png ...
layer_{L-1}.png (RGBA, straight alpha, layer_0 the opaque background, back to front); L is the number of layer files
(support/images.py reads and writes the format). Training reads any folder of images.

    # a balanced synthetic benchmark (L in {2, 3, 4}; the SynLayers idea: layer counts balanced by design)
    python data.py synthetic refs --num_samples 12 --seed 0
    # only the flattened images: training input (this is how examples/ was made)
    python data.py synthetic examples --num_samples 6 --seed 0 --size 320x256 --images_only
    # Crello designs with 2..4 layers at 640 px longest side (needs `pip install datasets`)
    python data.py crello crello_refs --split test
"""

import argparse
import functools
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from support import cli
from support.images import composite, pil_to_rgba, save_sample, to_image

# ---------------------------- synthetic layered designs (SynLayers: a scalable, L-balanced substitute for real layers)
WORDS = [
    "SALE",
    "Summer",
    "Open Day",
    "Coffee",
    "Design",
    "Hello",
    "NEW",
    "50% OFF",
    "Workshop",
    "Music",
    "Travel",
    "Fresh",
    "Join us",
    "Studio",
    "Market",
    "Big News",
]


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
    """Photo-like cut-out: smooth colour texture with lighting and grain, under a blob mask with soft edges."""
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    light = 0.75 + 0.25 * (xx / max(W, 1) * rng.uniform(-1, 1) + yy / max(H, 1) * rng.uniform(-1, 1))
    palette = rng.random((3, 3))  # three colours mixed by a smooth field: a muted, photo-like texture
    weights = _smooth_field(rng, size, int(rng.integers(4, 9))) ** 3
    total = weights.sum(-1, keepdims=True)  # 0 where the field is black in all three channels: an even mix there
    rgb = np.divide(weights, total, out=np.full_like(weights, 1 / 3), where=total > 0) @ palette
    rgb = rgb * light[..., None] + 0.03 * rng.standard_normal((H, W, 3))
    cx, cy = rng.uniform(0.25, 0.75) * W, rng.uniform(0.25, 0.75) * H
    rx, ry = rng.uniform(0.15, 0.3) * W, rng.uniform(0.15, 0.3) * H
    blobs = [(cx, cy, rx, ry)] + [
        (cx + rng.uniform(-rx, rx), cy + rng.uniform(-ry, ry), rx * rng.uniform(0.4, 0.8), ry * rng.uniform(0.4, 0.8))
        for _ in range(int(rng.integers(0, 3)))
    ]

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


def write_references(
    out_dir, num_samples: int = 12, seed: int = 0, size=(640, 640), layer_counts=(2, 3, 4), images_only: bool = False
) -> list:
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


# --------------------------------------------------------------------- Crello exporter (optional dependency: datasets)
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
        layers.append(functools.reduce(Image.alpha_composite, rest[start : start + count], blank))
        start += count
    return layers


def crello_elements(example: dict, canvas_width: int, canvas_height: int, longest_side: int = 640):
    """One Crello example -> (element dicts for `elements_to_layers`, (W, H)), the canvas scaled so its longest side
    is longest_side. left/top/width/height are fractions of the canvas when every width and height of the design is
    <= 1 (older releases), else pixels; elements without an image are skipped."""
    s = longest_side / max(canvas_width, canvas_height)
    frac = all(v <= 1.0 for v in list(example["width"]) + list(example["height"]))
    sx, sy = (canvas_width * s, canvas_height * s) if frac else (s, s)
    elements = [
        {
            "image": img,
            "left": example["left"][i] * sx,
            "top": example["top"][i] * sy,
            "width": example["width"][i] * sx,
            "height": example["height"][i] * sy,
            "angle": example["angle"][i],
            "opacity": example["opacity"][i],
        }
        for i, img in enumerate(example["image"])
        if img is not None
    ]
    return elements, (round(canvas_width * s), round(canvas_height * s))


def export_crello(
    out_dir,
    split: str = "test",
    num_samples=None,
    min_layers: int = 2,
    max_layers: int = 4,
    longest_side: int = 640,
    revision=None,
) -> list:
    """Write Crello (cyberagent/crello) designs that yield min_layers..max_layers layers (`crello_elements`, then
    `elements_to_layers`) in the reference format: out_dir/crello_<split>_<index>_<id>/."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "`python data.py crello` needs the optional package `datasets`: pip install datasets"
        ) from err
    ds = datasets.load_dataset("cyberagent/crello", split=split, revision=revision)
    folders = []
    for idx, ex in enumerate(tqdm(ds, desc=f"crello {split}")):
        if num_samples is not None and len(folders) >= num_samples:
            break
        cw, ch = (
            int(ds.features[k].int2str(ex[k])) if hasattr(ds.features[k], "int2str") else int(ex[k])
            for k in ("canvas_width", "canvas_height")
        )  # a class label in older releases
        layers = elements_to_layers(*crello_elements(ex, cw, ch, longest_side), max_layers)
        if min_layers <= len(layers) <= max_layers:
            image = to_image(composite(torch.stack([pil_to_rgba(x) for x in layers])))
            folders.append(save_sample(Path(out_dir) / f"crello_{split}_{idx:05d}_{ex['id']}", image, layers))
    return folders


# -------------------------------------------------------------------------------------------------------- command line
def _size(text: str):
    w, _, h = text.lower().partition("x")
    return int(w), int(h or w)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "synthetic",
        help="write synthetic layered designs in the reference format",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument("out_dir", help="output folder: out_dir/synth_<k>/ (or out_dir/synth_<k>.png with --images_only)")
    s.add_argument("--num_samples", type=int, default=12, help="designs to write")
    s.add_argument("--seed", type=int, default=0, help="sample k uses numpy.random.default_rng([seed, k])")
    s.add_argument("--size", type=_size, default=(640, 640), help="design size, W or WxH")
    s.add_argument("--layer_counts", type=int, nargs="+", default=[2, 3, 4], help="layer counts, cycled (balanced)")
    s.add_argument("--images_only", action="store_true", help="write only the flattened images (training input)")
    c = sub.add_parser(
        "crello",
        help="export Crello designs (cyberagent/crello) in the reference format",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("out_dir", help="output folder: out_dir/crello_<split>_<index>_<id>/")
    c.add_argument("--split", default="test", help="Crello split")
    c.add_argument("--num_samples", type=int, default=None, help="designs to export (default: all that qualify)")
    c.add_argument("--min_layers", type=int, default=2, help="keep designs with at least this many layers")
    c.add_argument("--max_layers", type=int, default=4, help="elements are grouped into at most this many layers")
    c.add_argument("--longest_side", type=int, default=640, help="canvas scaled to this longest side (released: 640)")
    c.add_argument("--revision", default=None, help="dataset revision (default: latest)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with cli.input_errors():
        if args.command == "synthetic":
            paths = write_references(
                args.out_dir, args.num_samples, args.seed, args.size, tuple(args.layer_counts), args.images_only
            )
            print(f"wrote {len(paths)} synthetic {'images' if args.images_only else 'samples'} to {args.out_dir}")
        else:
            paths = export_crello(
                args.out_dir,
                args.split,
                args.num_samples,
                args.min_layers,
                args.max_layers,
                args.longest_side,
                args.revision,
            )
            print(f"wrote {len(paths)} Crello samples to {args.out_dir}")


if __name__ == "__main__":
    main()
