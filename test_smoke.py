"""Smoke tests: CPU, offline, tiny randomly initialised real models: the sampler against diffusers, the
objective term by term, the loop's outputs, the LoRA's round trip, resume, learning. Run: python -m pytest -q"""

import io
import json
import math
import shutil
from contextlib import redirect_stderr

import numpy as np
import pytest
import torch
from PIL import Image

import grpo
import lora
import reward
import rollout
import train
from support.checkpoints import load_lora
from support.images import find_images, open_image


@pytest.fixture(scope="module")
def pipe():
    return rollout.load_pipeline("tiny")


# ----------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("layers,cfg", [(2, 1.0), (3, 4.0)])
def test_sampler_matches_diffusers_call(pipe, layers, cfg, design):
    """noise_level=0 is diffusers' own Euler loop: same layers as __call__ (640 px bucket, non-square, diffusers'
    area sizing; with CFG, its per-token norm rescale)."""
    image = design()
    ref = pipe(
        image.convert("RGBA"),
        rollout.DEFAULT_PROMPT,
        negative_prompt=" " if cfg > 1 else None,
        true_cfg_scale=cfg,
        cfg_normalize=cfg > 1,
        layers=layers,
        num_inference_steps=2,
        resolution=640,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # (layers, 4, H, W)
    traj = rollout.sample(
        pipe,
        [image],
        layers=layers,
        num_inference_steps=2,
        noise_level=0.0,
        resolution=640,
        true_cfg_scale=cfg,
        cfg_normalize=cfg > 1,
        generator=torch.Generator().manual_seed(0),
        sizing="area",
    )
    assert ref.shape == (layers, 4, 512, 768) and traj.layers.shape == (1, layers, 4, 512, 768)
    assert (traj.layers[0] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.3]))]
)
def test_log_prob_is_gaussian_mean_over_dims(sigma, sigma_next):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 12, 64, generator=g), torch.randn(2, 12, 64, generator=g)
    prev, log_prob, mean, std = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, generator=g)
    dt = torch.as_tensor(sigma_next) - torch.as_tensor(sigma)
    scale = std * torch.sqrt(-dt).reshape(-1, 1, 1)
    expected = torch.distributions.Normal(mean, scale).log_prob(prev).mean(dim=(1, 2))
    assert log_prob.shape == (2,) and torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-5)
    # the sigma == 1 guard uses sigma_next in the denominator: std = a sqrt(1 / (1 - 0.9)) at the first step
    if not torch.is_tensor(sigma) and sigma == 1.0:
        assert std.flatten()[0].item() == pytest.approx(0.7 * math.sqrt(1 / 0.1), rel=1e-6)
    # re-scoring the stored sample gives the same log-prob; noise 0 is exactly Euler
    _, again, _, _ = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.7, prev_sample=prev)
    assert torch.equal(again, log_prob)
    euler, lp0, _, _ = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, 0.0)
    assert torch.equal(euler, x + dt.reshape(-1, 1, 1) * v) and torch.equal(lp0, torch.zeros(2))


def test_cps_variant():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 8, 64, generator=g), torch.randn(3, 8, 64, generator=g)
    euler, _, _, _ = rollout.sde_step_with_logprob(v, x, 0.8, 0.6, 0.0, sde_type="cps")
    torch.testing.assert_close(euler, x - 0.2 * v, rtol=0, atol=1e-6)
    prev, lp, mean, s = rollout.sde_step_with_logprob(v, x, 0.8, 0.6, 0.5, generator=g, sde_type="cps")
    assert s.flatten()[0].item() == pytest.approx(0.6 * math.sin(0.25 * math.pi))
    torch.testing.assert_close(lp, -((prev - mean) ** 2).mean(dim=(1, 2)))


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_on_policy_ratio_is_one(pipe, cfg, design):
    """Two groups of two; re-scoring every stored transition with the unchanged policy gives ratio 1."""
    images = [design(seed=0), design(seed=1)]
    traj = rollout.sample(
        pipe,
        images,
        layers=2,
        group_size=2,
        num_inference_steps=4,
        noise_level=1.2,
        resolution=64,
        sde_window=(1, 3),
        true_cfg_scale=cfg,
        generator=torch.Generator().manual_seed(3),
    )
    assert traj.latents.shape[:2] == (4, 3) and traj.log_probs.shape == (4, 2)
    for j in range(2):
        for rows in (slice(None), slice(1, 3)):
            log_prob, _, _ = rollout.step_log_prob(pipe.transformer, traj, j, rows)
            ratio = torch.exp(log_prob - traj.log_probs[rows, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_layers_shape_range_dtype(pipe, layers, design):
    traj = rollout.sample(
        pipe,
        [design(seed=layers)],
        layers=layers,
        group_size=2,
        num_inference_steps=3,
        noise_level=1.0,
        resolution=96,
        generator=torch.Generator().manual_seed(0),
    )
    x = traj.layers
    assert x.shape == (2, layers, 4, 64, 96) and x.dtype == torch.float32  # 48x32 -> longest side 96, sides % 16
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert (x[0] - x[1]).abs().max().item() > 1e-3, "group members must get independent noise"
    again = rollout.sample(
        pipe,
        [design(seed=layers)],
        layers=layers,
        group_size=2,
        num_inference_steps=3,
        noise_level=1.0,
        resolution=96,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(x, again.layers), "same seed, same rollout"


def test_window_outside_is_ode(pipe, design):
    """With the window on the first step only, the later steps are deterministic given that step's sample."""
    kw = dict(layers=2, num_inference_steps=4, noise_level=1.0, resolution=64, sde_window=(0, 1))
    a = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(5), **kw)
    b = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(6), **kw)
    assert a.latents.shape[1] == 2 and a.log_probs.shape == (1, 1)
    assert not torch.equal(a.layers, b.layers)


def test_heun_beats_euler_at_equal_steps(pipe, design):
    """Heun (the released evaluation sampler) is closer than Euler to a 48-step Euler reference."""
    kw = dict(layers=2, resolution=64)
    ref = rollout.decompose(
        pipe, [design()], sampler="euler", num_inference_steps=48, generator=torch.Generator().manual_seed(0), **kw
    )
    heun = rollout.decompose(
        pipe, [design()], sampler="heun", num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw
    )
    euler = rollout.decompose(
        pipe, [design()], sampler="euler", num_inference_steps=4, generator=torch.Generator().manual_seed(0), **kw
    )
    assert (heun - ref).abs().mean() < 0.5 * (euler - ref).abs().mean()


def test_rollout_bad_input(pipe, tmp_path, design):
    (tmp_path / "notes.png").write_text("this is not a png")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="empty list"):
        rollout.sample(pipe, [], layers=2, resolution=64)
    with pytest.raises(ValueError, match="no readable image"):
        find_images(tmp_path)
    with pytest.raises(ValueError, match="different sizes"):
        rollout.sample(pipe, [design((48, 32)), design((32, 48))], layers=2, resolution=96)
    with pytest.raises(ValueError, match="never an SDE step"):
        rollout.sample(pipe, [design()], layers=2, resolution=64, num_inference_steps=3, sde_window=(1, 3))


@pytest.mark.parametrize(
    "aspect, longest, area",
    [
        ((1, 1), (640, 640), (640, 640)),
        ((4, 3), (640, 480), (736, 544)),
        ((16, 9), (640, 352), (864, 480)),
        ((3, 4), (480, 640), (544, 736)),
        ((9, 16), (352, 640), (480, 864)),
        ((3, 2), (640, 426 // 16 * 16), None),
        ((21, 9), (640, 272), None),
    ],
)
def test_condition_sizing_released_rule_and_area_rule(aspect, longest, area):
    """The released inference scales the longest side to --resolution (multiples of 16, rounded down); diffusers'
    area rule (kept as --sizing area, used by the parity test) gives other sizes for every non-square input."""
    image = Image.new("RGB", (aspect[0] * 120, aspect[1] * 120))
    assert rollout.condition_size(image, 640) == longest
    if area:
        assert rollout.condition_size(image, 640, sizing="area") == area
    assert (rollout.condition_size(image, 640, "area") != longest) == (aspect != (1, 1))


def test_any_image_mode(tmp_path):
    """Grey 16-bit, palette with transparency, CMYK, EXIF-rotated: all become RGB with the right content."""

    Image.fromarray(np.full((8, 10), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    pal = Image.new("P", (10, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "palette.png", transparency=0)
    Image.new("CMYK", (10, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rot = Image.new("RGB", (10, 8), (0, 0, 255))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rot.save(tmp_path / "rotated.jpg", exif=exif)
    paths = find_images(tmp_path)
    images = [open_image(p) for p in paths]
    got = {p.stem: im for p, im in zip(paths, images)}
    assert all(im.mode == "RGB" for im in images)
    assert got["grey16"].getpixel((0, 0)) == (255, 255, 255)
    assert got["palette"].getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert got["cmyk"].getpixel((0, 0))[0] > 200 and got["cmyk"].getpixel((0, 0))[1] < 60
    assert got["rotated"].size == (8, 10)


def test_rollout_cli_writes_png_layout(tmp_path, design):
    src = tmp_path / "in"
    src.mkdir()
    design(seed=1).save(src / "a.png")
    design((40, 40), seed=2).save(src / "b.jpg")
    out = tmp_path / "out"
    rollout.main(
        [
            "--images",
            str(src),
            "--pretrained_model_name_or_path",
            "tiny",
            "--device",
            "cpu",
            "--resolution",
            "64",
            "--group_size",
            "2",
            "--layers",
            "3",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    layers = sorted(out.glob("*/candidate_*/layer_*.png"))
    assert len(layers) == 2 * 2 * 3
    assert Image.open(out / "a" / "candidate_01" / "layer_2.png").mode == "RGBA"
    assert Image.open(out / "b" / "image.png").size == Image.open(out / "b" / "candidate_00" / "layer_0.png").size


# ----------------------------------------------------------------------------- grpo
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 2.0])
    a = grpo.group_advantages(r, 2)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]) / (1 + 1e-4))
    g = grpo.group_advantages(r, 3, global_std=True)
    std = r.std(unbiased=False)
    torch.testing.assert_close(
        g, torch.tensor([-2.0, 0.0, 2.0, 2.6667, -2.3333, -0.3333]) / (std + 1e-4), atol=1e-4, rtol=0
    )
    assert torch.equal(grpo.group_advantages(torch.full((4,), 7.0), 4), torch.zeros(4))
    assert grpo.group_advantages(torch.tensor([0.0, 1000.0]), 2, eps=0, adv_clip_max=0.5).abs().max() == 0.5
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(torch.ones(5), 2)


def test_policy_loss_clip_and_ratio_one():
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.tensor([-1.0, -2.0, -3.0])
    new = old.clone().requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item()) and float(stats["diag/ratio_mean"]) == 1.0
    loss.backward()
    torch.testing.assert_close(new.grad, -adv / 3)  # d/dlogp of -A*ratio/B at ratio 1
    # ratio 1.5 with A > 0 (clip binds above) and ratio 0.5 with A < 0 (binds below): zero gradient
    new = (old + torch.log(torch.tensor([1.5, 0.5, 1.0]))).requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    loss.backward()
    assert new.grad[:2].abs().max() == 0 and new.grad[2] != 0
    assert float(stats["diag/clipfrac"]) == pytest.approx(2 / 3)
    assert float(stats["diag/approx_kl"]) == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_kl_loss():
    m = torch.randn(2, 5, 4)
    assert grpo.kl_loss(m, m.clone(), torch.full((2, 1, 1), 0.3)).item() == 0.0
    kl = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5))
    assert kl.item() == pytest.approx(1 / (2 * 0.25))
    exact = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5), dt=-0.1)
    assert exact.item() == pytest.approx(1 / (2 * 0.25 * 0.1))


# ----------------------------------------------------------------------------- train
@pytest.fixture(scope="module")
def run(image_dir, tmp_path_factory, tiny_flags):
    out, err = tmp_path_factory.mktemp("run"), io.StringIO()
    with redirect_stderr(err):  # the corrupt PNG is skipped with one plain line
        pipe = train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(out),
                "--reward",
                "recon",
                "--layers",
                "2",
                "3",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--checkpoints_total_limit",
                "1",
                "--sample_every",
                "1",
                *tiny_flags(),
                "--images_per_step",
                "2",
            ]
        )
    skipped = [line for line in err.getvalue().splitlines() if "broken.png" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping {image_dir / 'broken.png'}: not a readable image (")
    return out, pipe


def test_train_outputs_and_first_ratio(run):
    out, pipe = run
    assert pipe.text_encoder is None and rollout.DEFAULT_PROMPT in pipe._prompt_cache  # encoded once, then freed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in [
        "reward/mean",
        "reward/std",
        "recon/l1",
        "loss/policy",
        "loss/kl",
        "diag/clipfrac",
        "diag/approx_kl",
        "diag/ratio_mean",
        "time/rollout_s",
        "time/reward_s",
        "time/train_s",
        "mem/peak_gb",
    ]:
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(abs(r["diag/ratio_mean"] - 1) < 1e-5 for r in records)  # one inner epoch: fully on-policy
    assert records[0]["reward/mean"] == pytest.approx(-records[0]["recon/l1"])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # pruned to the limit
    assert not list(out.glob(".*tmp"))
    assert Image.open(out / "samples" / "step-000002.png").size[0] > 64


def tiny_policy(image, rank, train_batch_size, sde_window):
    """A fresh tiny pipeline with a LoRA, train.py's args, and one group of 4 rollouts (T = 4, a = 1.2) of `image`."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny")
    params = lora.add_lora(pipe.transformer, rank, 2 * rank)
    args = train.parse_args(
        ["--images", ".", "--reward", "recon", "--beta", "0", "--train_batch_size", str(train_batch_size)]
    )
    traj = rollout.sample(
        pipe,
        [image],
        layers=2,
        group_size=4,
        num_inference_steps=4,
        noise_level=1.2,
        resolution=64,
        sde_window=sde_window,
        generator=torch.Generator().manual_seed(0),
    )
    return pipe, params, args, traj


def test_update_follows_advantages(design):
    """After one update, the log-prob of each stored transition moves with its advantage."""
    pipe, params, args, traj = tiny_policy(design(), 8, 4, (0, 2))
    advantages = torch.tensor([1.5, -0.5, 0.5, -1.5])
    stats = train.policy_update(pipe.transformer, [traj], advantages, args, params, torch.optim.AdamW(params, lr=1e-2))
    assert stats["diag/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and stats["train/skipped_updates"] == 0
    with torch.no_grad():
        new = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
    delta = (new - traj.log_probs).sum(1)
    assert torch.corrcoef(torch.stack([delta, advantages]))[0, 1] > 0.9


def test_non_finite_loss_skips_the_update(design):
    pipe, params, args, traj = tiny_policy(design(), 4, 2, (0, 1))
    before = [p.detach().clone() for p in params]
    stats = train.policy_update(
        pipe.transformer,
        [traj],
        torch.tensor([1.0, float("nan"), -1.0, 0.0]),
        args,
        params,
        torch.optim.AdamW(params, lr=1e-2),
    )
    assert stats["train/skipped_updates"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params)) and all(p.grad is None for p in params)


def test_saved_lora_reproduces_the_trained_policy(run, design):
    """The final LoRA loads through diffusers' load_lora_weights, through peft, and through lora.load_lora,
    and each gives the trained policy's velocity."""
    from peft import PeftModel

    out, trained = run
    image = design()
    probe = rollout.sample(
        trained,
        [image],
        layers=2,
        num_inference_steps=2,
        noise_level=0,
        resolution=64,
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    x, t = probe.latents[:, 0], probe.timesteps[0]
    with torch.no_grad():
        expected = rollout.predict_velocity(trained.transformer, probe, x, t)
        base = rollout.predict_velocity(rollout.load_pipeline("tiny").transformer, probe, x, t)
        assert (expected - base).abs().max() > 1e-4, "the trained LoRA must change the policy"
        via_diffusers = rollout.load_pipeline("tiny")
        via_diffusers.load_lora_weights(str(out))
        via_peft = PeftModel.from_pretrained(rollout.load_pipeline("tiny").transformer, str(out / "peft"))
        via_rollout = rollout.load_pipeline("tiny")
        load_lora(via_rollout, out / "peft")
        for model in (via_diffusers.transformer, via_peft, via_rollout.transformer):
            torch.testing.assert_close(rollout.predict_velocity(model, probe, x, t), expected, rtol=0, atol=1e-6)


def test_init_lora_starts_from_it_and_is_the_kl_reference(run, image_dir, tmp_path, capsys, design, tiny_flags):
    """--init_lora: the step-0 policy is base + that LoRA (velocity equal to loading it for inference), the KL of
    the first step is 0 (the reference is that starting policy, not the bare base), and the result still loads on
    the bare base model; a folder that holds no LoRA of this model exits 2."""
    start, _ = run
    out = tmp_path / "grpo"
    pipe = train.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(out),
            "--reward",
            "recon",
            "--layers",
            "2",
            "--init_lora",
            str(start),
            "--beta",
            "0.04",
            "--max_train_steps",
            "1",
            "--sample_every",
            "0",
            "--learning_rate",
            "1e-2",
            *tiny_flags(),
        ]
    )
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["loss/kl"] == 0.0 and abs(record["diag/ratio_mean"] - 1) < 1e-5
    probe = rollout.sample(
        pipe,
        [design()],
        layers=2,
        num_inference_steps=2,
        noise_level=0,
        resolution=64,
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    x, t = probe.latents[:, 0], probe.timesteps[0]
    with torch.no_grad(), lora.reference_policy(pipe.transformer):
        reference = rollout.predict_velocity(pipe.transformer, probe, x, t)
    from peft import PeftModel

    started, via_diffusers, via_rollout = (rollout.load_pipeline("tiny") for _ in range(3))
    load_lora(started, start / "peft")
    via_diffusers.load_lora_weights(str(out))
    load_lora(via_rollout, out / "peft")
    via_peft = PeftModel.from_pretrained(rollout.load_pipeline("tiny").transformer, str(out / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(
            reference, rollout.predict_velocity(started.transformer, probe, x, t), rtol=0, atol=1e-6
        )
        after = rollout.predict_velocity(pipe.transformer, probe, x, t)
        for model in (via_diffusers.transformer, via_rollout.transformer, via_peft):  # the bare base + the result
            torch.testing.assert_close(rollout.predict_velocity(model, probe, x, t), after, rtol=0, atol=1e-6)
        assert (after - reference).abs().max() > 1e-5  # one update moved the policy away from its start
    with pytest.raises(SystemExit) as e:
        train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path / "bad"),
                "--reward",
                "recon",
                "--init_lora",
                str(image_dir),
                *tiny_flags(),
            ]
        )
    assert e.value.code == 2 and "--init_lora" in capsys.readouterr().err


def test_resume_gives_the_same_run(image_dir, tmp_path, tiny_flags, peft_weights):
    """Killed between checkpoints, resumed from the last one: same weights and the same log as one straight run."""
    common = [
        "--images",
        str(image_dir),
        "--reward",
        "recon",
        "--layers",
        "2",
        "--checkpointing_steps",
        "2",
        "--sample_every",
        "0",
        "--learning_rate",
        "1e-2",
        *tiny_flags(),
    ]
    train.main([*common, "--output_dir", str(tmp_path / "straight"), "--max_train_steps", "4"])
    train.main([*common, "--output_dir", str(tmp_path / "resumed"), "--max_train_steps", "3"])
    shutil.rmtree(tmp_path / "resumed" / "checkpoint-3")  # killed after step 3 was logged, before its checkpoint
    train.main(
        [
            *common,
            "--output_dir",
            str(tmp_path / "resumed"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    a = peft_weights(tmp_path / "straight")
    b = peft_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rewards = [
        [json.loads(line)["reward/mean"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("straight", "resumed")
    ]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 4


def test_learning_raises_the_reward_and_flipped_sign_lowers_it(tmp_path, monkeypatch, design, tiny_flags):
    """The method works: a short run on the tiny model raises a programmatic reward (the background layer's
    opacity) measured on fixed evaluation seeds; training on the negated reward (advantages' sign flipped)
    lowers it."""
    score = reward.REWARDS["opaque_background"]
    monkeypatch.setitem(reward.REWARDS, "flipped", lambda *a, **k: (-score(*a, **k)[0], {}))
    (tmp_path / "images").mkdir()
    for i in range(4):
        design((48, 32), seed=i).save(tmp_path / "images" / f"{i}.png")
    images = [design((48, 32), seed=i) for i in range(2)]

    def evaluate(adapter=None):
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
        return score(images, traj.layers, 8)[0].mean().item()

    results = {"base": evaluate()}
    for name in ("opaque_background", "flipped"):
        train.main(
            [
                "--images",
                str(tmp_path / "images"),
                "--output_dir",
                str(tmp_path / name),
                "--reward",
                name,
                "--layers",
                "2",
                "--max_train_steps",
                "20",
                "--checkpointing_steps",
                "100",
                "--sample_every",
                "0",
                "--beta",
                "0",
                "--learning_rate",
                "3e-2",
                *tiny_flags(),
                "--group_size",
                "8",
            ]
        )
        results[name] = evaluate(tmp_path / name / "peft")
    print("learning test (mean background alpha, fixed seeds):", results)
    assert results["opaque_background"] > results["base"] + 0.01
    assert results["flipped"] < results["base"] - 0.01
