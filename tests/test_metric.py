"""The paper's metric on the toy pipeline (CPU, offline, ~20 s): the tiny VAE reconstructs, supervised training
lowers evaluate.py's per-layer L1 on held-out references, GRPO on `recon` raises that reward on fixed seeds.

    python -m pytest -q test_metric.py -s     # -s prints the tables and figures
"""

import contextlib
import io

import numpy as np
import torch

import data
import evaluate as ev
import reward
import rollout
import sft
import train
from support.checkpoints import load_lora
from support.images import open_image, over_white, pil_to_rgba


def round_trip_l1(vae, num_samples=12, seed=0, size=64):
    """How far decode(encode(layer)) is from the layer, over every layer of `python data.py synthetic --num_samples
    12 --seed 0 --size 64` (made in memory): (mean over pixels and the 4 straight RGBA channels in [0, 1], mean over
    pixels and RGB over white: evaluate.py's per-layer L1 with the round trip as the prediction)."""
    designs = [
        data.make_design(np.random.default_rng([seed, k]), (2, 3, 4)[k % 3], (size, size)) for k in range(num_samples)
    ]
    layers = torch.stack([pil_to_rgba(layer) for _, design in designs for layer in design])  # (N, 4, H, W) in [0, 1]
    with torch.no_grad():  # one frame each
        z = vae.encode(layers[:, :, None] * 2 - 1).latent_dist.mode()
        out = vae.decode(z).sample[:, :, 0] / 2 + 0.5
    white = [(over_white(a) - over_white(b)).abs().mean() for a, b in zip(out, layers)]
    return (out - layers).abs().mean().item(), torch.stack(white).mean().item()


def test_tiny_vae_reconstructs_rgba_layers():
    """The tiny pipeline's VAE: z is the 4x4 block means laid out space-to-depth (as tiny_vae says) and
    decode(encode(layer)) is within 0.05 mean L1 of the layers of `python data.py synthetic --size 64` (straight
    RGBA, and over white as evaluate.py scores)."""
    vae = rollout.load_pipeline("tiny").vae
    rgba, white = round_trip_l1(vae)
    print(f"round trip on 36 layers of 12 designs, 64 px: mean L1 {rgba:.4f} (RGBA), {white:.4f} (over white)")
    assert rgba <= 0.05 and white <= 0.05

    image, layers = data.make_design(np.random.default_rng([3, 0]), 3, (64, 48))  # non-square: h != w
    x = torch.stack([pil_to_rgba(image.convert("RGBA"))] + [pil_to_rgba(layer) for layer in layers]) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]  # (4, 16, 6, 8)
    means = torch.nn.functional.avg_pool2d(x, 4)  # (4, 4, 12, 16)
    expected = torch.cat([means[:, :, dy::2, dx::2] for dy in range(2) for dx in range(2)], 1)
    assert (z - expected).abs().max() < 1e-4  # the heads' norms: relative error <= 1.6e-5
    with torch.no_grad():
        decoded = vae.decode(z[:, :, None]).sample[:, :, 0]  # (4, 4, 48, 64)
    cells = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), scale_factor=8)  # 8x8 block means
    assert (decoded - cells).abs().max() < 1e-4


def test_supervised_lowers_per_layer_l1_on_held_out_references(tmp_path):
    """sft.py, 50 steps on 64 synthetic designs (numpy.random.default_rng([42, k])), lowers evaluate.py's per-layer
    L1 (the mean over the L layers) for every L in {2, 3, 4} by more than 0.02 against the base model, on 12
    references it never trained on (`data.py synthetic`, default_rng([0, k])), same initial noise for both. Measured
    2026-12-04: 0.394 -> 0.351, 0.394 -> 0.304, 0.406 -> 0.332, on the mostly transparent upper layers. The
    background (Pred 0) is not asserted: it gets worse at L = 2 and 4 (docs/training.md says why we think so)."""
    out, refs = tmp_path / "sft", tmp_path / "refs"
    sft.main(
        [
            "--device",
            "cpu",
            "--pretrained_model_name_or_path",
            "tiny",
            "--synthetic",
            "64",
            "--resolution",
            "64",
            "--layers",
            "2",
            "3",
            "4",
            "--max_train_steps",
            "50",
            "--rank",
            "16",
            "--lora_alpha",
            "16",
            "--learning_rate",
            "1e-2",
            "--validation_synthetic",
            "0",
            "--dataloader_num_workers",
            "0",
            "--report_to",
            "none",
            "--output_dir",
            str(out),
        ]
    )
    data.write_references(refs, 12, seed=0, size=(64, 64), layer_counts=(2, 3, 4))
    folders = ev.predict_with_model(
        refs,
        {"base": None, "sft": str(out)},
        tmp_path / "eval",
        "tiny",
        num_inference_steps=4,
        resolution=64,
        device="cpu",
        mixed_precision="no",
    )
    with contextlib.redirect_stdout(io.StringIO()) as table:
        results = ev.evaluate(refs, folders, tmp_path / "eval", layerd=False)
    print("\n" + table.getvalue())
    for L in ("2", "3", "4"):
        base, trained = results["base"][L], results["sft"][L]
        assert base["n"] == trained["n"] == 4
        assert trained["mean_l1"] < base["mean_l1"] - 0.02, f"L={L}: {base['mean_l1']:.4f} -> {trained['mean_l1']:.4f}"


def test_grpo_on_recon_raises_it_on_fixed_seeds(tmp_path):
    """train.py --reward recon, 12 steps of G = 4 on 4 designs (L = 2), raises the mean recon reward (minus the L1 of
    the layers' composite to the input) of 8 candidates per image, drawn with fixed seeds, by more than 0.03 on two of
    its training images and on two images it never saw. Measured 2026-12-04: -0.264 -> -0.198 and -0.249 -> -0.190."""
    (tmp_path / "images").mkdir()
    for k in range(4):
        data.make_design(np.random.default_rng([5, k]), 2, (64, 64))[0].save(tmp_path / "images" / f"{k}.png")
    seen = [open_image(tmp_path / "images" / f"{k}.png") for k in range(2)]
    unseen = [data.make_design(np.random.default_rng([6, k]), 2, (64, 64))[0] for k in range(2)]

    def recon(images, adapter=None):
        pipe = rollout.load_pipeline("tiny")
        if adapter:
            load_lora(pipe, adapter)
        traj = rollout.sample(
            pipe,
            images,
            layers=2,
            group_size=8,
            num_inference_steps=4,
            noise_level=1.2,
            resolution=64,
            generator=torch.Generator().manual_seed(100),
        )
        return reward.recon_reward(images, traj.layers, 8)[0].mean().item()

    before = {"seen": recon(seen), "unseen": recon(unseen)}
    train.main(
        [
            "--device",
            "cpu",
            "--images",
            str(tmp_path / "images"),
            "--output_dir",
            str(tmp_path / "grpo"),
            "--pretrained_model_name_or_path",
            "tiny",
            "--reward",
            "recon",
            "--layers",
            "2",
            "--resolution",
            "64",
            "--group_size",
            "4",
            "--num_inference_steps",
            "4",
            "--max_train_steps",
            "12",
            "--beta",
            "0",
            "--learning_rate",
            "3e-2",
            "--rank",
            "4",
            "--lora_alpha",
            "8",
            "--mixed_precision",
            "no",
            "--train_batch_size",
            "4",
            "--images_per_step",
            "1",
            "--checkpointing_steps",
            "100",
            "--sample_every",
            "0",
            "--report_to",
            "none",
        ]
    )
    after = {name: recon(images, tmp_path / "grpo" / "peft") for name, images in (("seen", seen), ("unseen", unseen))}
    print(f"recon reward (fixed seeds, 2 images x 8): base {before}, after 12 GRPO steps {after}")
    for name in before:
        assert after[name] > before[name] + 0.03
