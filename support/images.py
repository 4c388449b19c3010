"""Image files in, layered references in and out: the training images and the reference format.

Training and rollouts read a folder of images (any format PIL opens, searched recursively). Evaluation reads layered
references, one folder per sample: image.png (the flattened design) and layer_0.png ... layer_{L-1}.png (RGBA,
straight alpha, layer_0 the opaque background, back to front); L is the number of layer files. Layers as tensors are
(4, H, W) straight alpha in [0, 1]; a stack is (N, 4, H, W), layer 0 at the back.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------- images in
def open_image(path):
    """Any image file as an RGB PIL image: EXIF rotation applied, alpha flattened over white, 16-bit and
    float greys scaled to 8 bit, palette/CMYK converted. Raises ValueError naming the file if unreadable."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    return to_rgb(im)


def to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def find_images(folder):
    """Paths of all readable images under `folder` (recursive, sorted). Each is decoded once to check it, not
    kept: callers open an image when they need it. Unreadable files are skipped with one line naming each;
    a missing folder or one with no image raises (FileNotFoundError, ValueError) with a message for the user."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    paths = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        try:
            open_image(p)
            paths.append(p)
        except ValueError as e:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                print(f"skipping {e}", file=sys.stderr)
    if not paths:
        raise ValueError(
            f"--images {folder}: no readable image found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return paths


# ----------------------------------------------------------------------------- layered references
def pil_to_rgba(image: Image.Image) -> torch.Tensor:
    """A PIL image as a (4, H, W) float32 straight-alpha tensor in [0, 1]."""
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


def save_layers(layers_k, folder):
    """(N, 4, H, W) in [0, 1] -> folder/layer_<i>.png (RGBA, layer_0 the background)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, layer in enumerate(layers_k):
        array = (layer.permute(1, 2, 0).float().cpu().numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(array, "RGBA").save(folder / f"layer_{i}.png")


def layer_indices(folder: Path, required: bool = False) -> list:
    """The i of folder/layer_<i>.png, sorted; ValueError unless they run 0..k-1 without gaps (and, if required,
    at least one is there)."""
    idx = sorted(int(p.stem[6:]) for p in Path(folder).glob("layer_*.png") if p.stem[6:].isdigit())
    if idx != list(range(len(idx))) or (required and not idx):
        raise ValueError(f"layer files must be layer_0.png .. layer_{{L-1}}.png without gaps, found indices {idx}")
    return idx


def load_layer_files(folder: Path, what: str) -> list:
    """layer_0.png ... layer_{k-1}.png of a folder as (4, H, W) tensors; the indices must run 0..k-1 without gaps."""
    try:
        idx = layer_indices(folder)
    except ValueError as e:
        raise ValueError(f"{what} {folder}: {e}") from None
    return [pil_to_rgba(Image.open(folder / f"layer_{i}.png")) for i in idx]


def list_references(references) -> list:
    """The sample folders of a reference root (sorted); each must hold image.png and layer_0.png."""
    root = Path(references)
    if not root.is_dir():
        raise FileNotFoundError(
            f"--references {root}: no such folder (make one with `python data.py synthetic DIR` "
            f"or `python data.py crello DIR`)"
        )
    samples = sorted(p for p in root.iterdir() if p.is_dir() and (p / "layer_0.png").exists())
    if not samples:
        raise ValueError(
            f"--references {root}: no sample folders holding layer_0.png (see the reference format in the docstring)"
        )
    for p in samples:
        if not (p / "image.png").exists():
            raise ValueError(f"reference {p}: image.png is missing (the flattened design is needed for recon_l1)")
    return samples
