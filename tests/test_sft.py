"""Tests of sft.py on the tiny random pipeline (CPU, offline, ~15 s): python -m pytest -q test_sft.py"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import rollout
import sft
from support.checkpoints import load_lora


def vae_alone(vae, frame):
    """decode(encode(frame)) by the VAE alone, no normalisation or packing: (4, H, W) in [-1, 1] -> [0, 1]."""
    with torch.no_grad():
        z = vae.encode(frame[None, :, None]).latent_dist.mode()
        return (vae.decode(z, return_dict=False)[0][0, :, 0] / 2 + 0.5).clamp(0, 1)


def test_target_round_trip_through_decode_layers():
    """A design's layers packed as sft packs its target, decoded by rollout.decode_layers (the sampler's decode),
    give layer by layer what the VAE alone gives; a swapped, shifted or reversed frame order does not."""
    pipe = rollout.load_pipeline("tiny")
    g = torch.Generator().manual_seed(0)  # non-trivial latents_mean/std, so normalise -> denormalise is exercised
    pipe.vae.register_to_config(
        latents_mean=(torch.randn(16, generator=g) * 0.3).tolist(),
        latents_std=(torch.rand(16, generator=g) + 0.5).tolist(),
    )
    for L in (2, 3, 4):
        image, layers = data.make_design(np.random.default_rng([7, L]), L, (64, 32))  # non-square: h != w
        pixels = sft.sample_pixels(pipe, image, layers, 64)  # (L+1, 4, H, W)
        H, W = pixels.shape[-2:]
        expected = torch.stack([vae_alone(pipe.vae, pixels[i + 1]) for i in range(L)])  # (L, 4, H, W)

        def error(order):
            x0, cond = sft.pack_target(pipe, pixels[order])
            return (rollout.decode_layers(pipe, x0, H, W, L)[0] - expected).abs().amax(dim=(1, 2, 3)), x0, cond

        per_layer, x0, cond = error(list(range(L + 1)))
        print(f"L={L} {W}x{H}: max |decode_layers - VAE alone| per layer {per_layer.tolist()}")
        assert per_layer.max() < 1e-5
        assert torch.equal(x0[:, : cond.shape[1]], cond.float())  # frame 0 (the composite) is the condition
        traj = rollout.sample(
            pipe, [image], layers=L, num_inference_steps=1, noise_level=0.0, resolution=64, decode=False
        )  # the sampler: same condition tokens, noise of the target's shape
        assert (traj.image_latents - cond).abs().max() < 1e-5 and traj.latents.shape[2:] == x0.shape[1:]
        wrong = {
            "layers 0 and 1 swapped": [0, 2, 1, *range(3, L + 1)],
            "composite last (shifted by one)": [*range(1, L + 1), 0],
            "layers reversed": [0, *range(L, 0, -1)],
        }
        for name, order in wrong.items():
            bad = error(order)[0]
            print(f"  {name}: max error {bad.max():.3f}")
            assert bad.max() > 1e-2, f"{name} passed the round trip"


def held_out_loss(pipe, args, specs, tag):
    """The flow-matching loss over specs with fixed draws (seed, tag, j), as sft.validate computes val/loss."""
    prompt = rollout.encode_prompt(pipe, args.prompt)
    samples = sft.Samples(specs, args.resolution, pipe.image_processor)
    draws = [torch.Generator().manual_seed(sft.rng_seed(args.seed, tag, j)) for j in range(len(samples))]
    prepared = [sft.prepare(pipe, samples[j][1], args, draws[j], {}) for j in range(len(samples))]
    return sft.validate(pipe.transformer, prompt, prepared, args)


def test_training_lowers_train_and_held_out_loss(tmp_path):
    out = tmp_path / "sft"
    argv = [
        "--device",
        "cpu",
        "--pretrained_model_name_or_path",
        "tiny",
        "--synthetic",
        "16",
        "--resolution",
        "32",
        "--layers",
        "2",
        "3",
        "--max_train_steps",
        "24",
        "--validation_synthetic",
        "4",
        "--validation_every",
        "12",
        "--rank",
        "8",
        "--lora_alpha",
        "8",
        "--learning_rate",
        "2e-3",
        "--report_to",
        "none",
        "--output_dir",
        str(out),
    ]
    sft.main(argv)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(25)) and all("loss" in r for r in rows[1:])
    val = {r["step"]: r["val/loss"] for r in rows if "val/loss" in r}
    assert sorted(val) == [0, 12, 24]
    train_loss = [r["loss"] for r in rows[1:]]
    first, last = np.mean(train_loss[:8]), np.mean(train_loss[-8:])
    print(f"val/loss {val}; training loss, mean of the first 8 steps {first:.4f}, last 8 {last:.4f}")
    assert val[24] < val[0] - 0.01 and last < first

    # the saved LoRA, loaded on a fresh base by --eval_lora, reproduces the last val/loss; it lowers the loss on
    # the training designs themselves (fixed draws) below the base model's
    reloaded = sft.main(argv + ["--eval_lora", str(out)])
    args = sft.parse_args(argv)
    pipe = rollout.load_pipeline("tiny")
    train_specs = sft.synthetic_specs(args.synthetic, args.seed, args.layers, args.resolution)
    base = held_out_loss(pipe, args, train_specs, 3)
    load_lora(pipe, out)
    trained = held_out_loss(pipe, args, train_specs, 3)
    print(f"loss on the training designs: base {base:.4f}, trained {trained:.4f}; --eval_lora val/loss {reloaded:.6f}")
    assert trained < base - 0.01
    assert reloaded == pytest.approx(val[24], rel=1e-5)


def write_sample(folder, size, layer_sizes):
    folder.mkdir(parents=True)
    Image.new("RGB", size, (200, 120, 40)).save(folder / "image.png")
    for i, s in enumerate(layer_sizes):
        Image.new("RGBA", s, (10 * i, 50, 90, 255 if i == 0 else 128)).save(folder / f"layer_{i}.png")


def test_bad_samples_are_skipped_and_none_left_exits_2(tmp_path, capsys):
    root = tmp_path / "refs"
    write_sample(root / "good", (32, 32), [(32, 32)] * 2)
    write_sample(root / "wrong_size", (32, 32), [(32, 32), (24, 32)])
    write_sample(root / "too_many", (32, 32), [(32, 32)] * 11)  # --max_layers defaults to 10
    out = tmp_path / "out"
    sft.main(
        [
            "--device",
            "cpu",
            "--pretrained_model_name_or_path",
            "tiny",
            "--data",
            str(root),
            "--resolution",
            "32",
            "--max_train_steps",
            "2",
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
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("skipping sample")]
    print("\n".join(lines))
    assert len(lines) == 2
    assert any(
        "wrong_size" in line and "layer_1.png is 24x32 but image.png is 32x32 (layers must have its size)" in line
        for line in lines
    )
    assert any("too_many" in line and "11 layers, more than --max_layers 10" in line for line in lines)
    assert "1 training samples" in captured.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["layers"] for r in rows] == [[2], [2]]  # only the good sample (L = 2) was trained on

    (root / "good" / "layer_1.png").unlink()
    Image.new("RGBA", (16, 16)).save(root / "good" / "layer_1.png")
    with pytest.raises(SystemExit) as e:
        sft.main(
            [
                "--device",
                "cpu",
                "--pretrained_model_name_or_path",
                "tiny",
                "--data",
                str(root),
                "--report_to",
                "none",
                "--output_dir",
                str(tmp_path / "out2"),
            ]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("skipping sample") == 3 and "no usable sample left" in err and "Traceback" not in err


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    """Stopped at a checkpoint and resumed, a run logs the same numbers and saves the same LoRA as one that never
    stopped: data order, sigmas and noise derive from (seed, step), the optimizer state is restored."""
    from safetensors.torch import load_file

    argv = [
        "--device",
        "cpu",
        "--pretrained_model_name_or_path",
        "tiny",
        "--synthetic",
        "8",
        "--resolution",
        "32",
        "--layers",
        "2",
        "3",
        "--validation_synthetic",
        "2",
        "--validation_every",
        "3",
        "--checkpointing_steps",
        "3",
        "--rank",
        "4",
        "--lora_alpha",
        "4",
        "--learning_rate",
        "1e-3",
        "--dataloader_num_workers",
        "1",
        "--report_to",
        "none",
    ]
    sft.main(argv + ["--max_train_steps", "6", "--output_dir", str(tmp_path / "a")])
    sft.main(argv + ["--max_train_steps", "3", "--output_dir", str(tmp_path / "b")])
    sft.main(
        argv + ["--max_train_steps", "6", "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"]
    )

    def numbers(run):
        return [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]

    assert numbers("a") == numbers("b") and len(numbers("a")) == 7
    a, b = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors") for run in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
