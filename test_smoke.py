"""Smoke tests: CPU, offline, tiny randomly initialised real models. Run: python -m pytest -q test_smoke.py"""

import math

import pytest
import torch
from PIL import Image, ImageDraw

import grpo
import rollout

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pipe():
    return rollout.load_pipeline("tiny")


def design(size=(48, 32), seed=0):
    """A small non-square 'layered design': background, a rectangle, an ellipse, a line of text."""
    g = torch.Generator().manual_seed(seed)
    c = [tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g)) for _ in range(3)]
    im = Image.new("RGB", size, c[0])
    d = ImageDraw.Draw(im)
    d.rectangle([4, 4, size[0] // 2, size[1] // 2], fill=c[1])
    d.ellipse([size[0] // 2, size[1] // 3, size[0] - 3, size[1] - 3], fill=c[2])
    d.text((2, size[1] - 12), "Hi", fill=(255, 255, 255))
    return im


# ----------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("layers,cfg", [(2, 1.0), (3, 4.0)])
def test_sampler_matches_diffusers_call(pipe, layers, cfg):
    """noise_level=0 is diffusers' own Euler loop: same layers as __call__ (640 px bucket, non-square)."""
    image = design()
    ref = pipe(image.convert("RGBA"), rollout.DEFAULT_PROMPT, negative_prompt=" " if cfg > 1 else None,
               true_cfg_scale=cfg, layers=layers, num_inference_steps=2, resolution=640, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images[0]  # (layers, 4, H, W)
    traj = rollout.sample(pipe, [image], layers=layers, num_inference_steps=2, noise_level=0.0, resolution=640,
                          true_cfg_scale=cfg, generator=torch.Generator().manual_seed(0))
    assert ref.shape == (layers, 4, 512, 768) and traj.layers.shape == (1, layers, 4, 512, 768)
    assert (traj.layers[0] - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.6, 0.45), (torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.3]))])
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
def test_on_policy_ratio_is_one(pipe, cfg):
    """Two groups of two; re-scoring every stored transition with the unchanged policy gives ratio 1."""
    images = [design(seed=0), design(seed=1)]
    traj = rollout.sample(pipe, images, layers=2, group_size=2, num_inference_steps=4, noise_level=1.2,
                          resolution=64, sde_window=(1, 3), true_cfg_scale=cfg,
                          generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape[:2] == (4, 3) and traj.log_probs.shape == (4, 2)
    for j in range(2):
        for rows in (slice(None), slice(1, 3)):
            log_prob, _, _ = rollout.step_log_prob(pipe.transformer, traj, j, rows)
            ratio = torch.exp(log_prob - traj.log_probs[rows, j])
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_layers_shape_range_dtype(pipe, layers):
    traj = rollout.sample(pipe, [design(seed=layers)], layers=layers, group_size=2, num_inference_steps=3,
                          noise_level=1.0, resolution=96, generator=torch.Generator().manual_seed(0))
    x = traj.layers
    assert x.shape == (2, layers, 4, 64, 128) and x.dtype == torch.float32  # 48x32 -> about 96^2, sides % 32
    assert 0.0 <= x.min().item() and x.max().item() <= 1.0
    assert (x[0] - x[1]).abs().max().item() > 1e-3, "group members must get independent noise"
    again = rollout.sample(pipe, [design(seed=layers)], layers=layers, group_size=2, num_inference_steps=3,
                           noise_level=1.0, resolution=96, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again.layers), "same seed, same rollout"


def test_window_outside_is_ode(pipe):
    """With the window on the first step only, the later steps are deterministic given that step's sample."""
    kw = dict(layers=2, num_inference_steps=4, noise_level=1.0, resolution=64, sde_window=(0, 1))
    a = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(5), **kw)
    b = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(6), **kw)
    assert a.latents.shape[1] == 2 and a.log_probs.shape == (1, 1)
    assert not torch.equal(a.layers, b.layers)


def test_heun_beats_euler_at_equal_steps(pipe):
    """Heun (the released evaluation sampler) is closer than Euler to a 48-step Euler reference."""
    kw = dict(layers=2, resolution=64)
    ref = rollout.decompose(pipe, [design()], sampler="euler", num_inference_steps=48,
                            generator=torch.Generator().manual_seed(0), **kw)
    heun = rollout.decompose(pipe, [design()], sampler="heun", num_inference_steps=4,
                             generator=torch.Generator().manual_seed(0), **kw)
    euler = rollout.decompose(pipe, [design()], sampler="euler", num_inference_steps=4,
                              generator=torch.Generator().manual_seed(0), **kw)
    assert (heun - ref).abs().mean() < 0.5 * (euler - ref).abs().mean()


def test_bad_input(pipe, tmp_path):
    (tmp_path / "notes.png").write_text("this is not a png")
    with pytest.raises(ValueError, match="notes.png: not a readable image"):
        rollout.open_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="empty list"):
        rollout.sample(pipe, [], layers=2, resolution=64)
    with pytest.raises(SystemExit, match="no readable image"):
        rollout.load_images(tmp_path)
    with pytest.raises(ValueError, match="different sizes"):
        rollout.sample(pipe, [design((48, 32)), design((32, 48))], layers=2, resolution=96)


def test_any_image_mode(tmp_path):
    """Grey 16-bit, palette with transparency, CMYK, EXIF-rotated: all become RGB with the right content."""
    import numpy as np

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
    paths, images = rollout.load_images(tmp_path)
    got = {p.stem: im for p, im in zip(paths, images)}
    assert all(im.mode == "RGB" for im in images)
    assert got["grey16"].getpixel((0, 0)) == (255, 255, 255)
    assert got["palette"].getpixel((0, 0)) == (255, 255, 255)  # fully transparent -> white
    assert got["cmyk"].getpixel((0, 0))[0] > 200 and got["cmyk"].getpixel((0, 0))[1] < 60
    assert got["rotated"].size == (8, 10)


def test_rollout_cli_writes_png_layout(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    design(seed=1).save(src / "a.png")
    design((40, 40), seed=2).save(src / "b.jpg")
    out = tmp_path / "out"
    rollout.main(["--images", str(src), "--pretrained_model_name_or_path", "tiny", "--resolution", "64",
                  "--group_size", "2", "--layers", "3", "--num_inference_steps", "2", "--output_dir", str(out)])
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
    torch.testing.assert_close(g, torch.tensor([-2.0, 0.0, 2.0, 2.6667, -2.3333, -0.3333]) / (std + 1e-4), atol=1e-4,
                               rtol=0)
    assert torch.equal(grpo.group_advantages(torch.full((4,), 7.0), 4), torch.zeros(4))
    assert grpo.group_advantages(torch.tensor([0.0, 1000.0]), 2, eps=0, adv_clip_max=0.5).abs().max() == 0.5
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(torch.ones(5), 2)


def test_policy_loss_clip_and_ratio_one():
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.tensor([-1.0, -2.0, -3.0])
    new = old.clone().requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    assert loss.item() == pytest.approx(-adv.mean().item()) and stats["diag/ratio_mean"] == 1.0
    loss.backward()
    torch.testing.assert_close(new.grad, -adv / 3)  # d/dlogp of -A*ratio/B at ratio 1
    # ratio 1.5 with A > 0 (clip binds above) and ratio 0.5 with A < 0 (binds below): zero gradient
    new = (old + torch.log(torch.tensor([1.5, 0.5, 1.0]))).requires_grad_()
    loss, stats = grpo.policy_loss(new, old, adv, clip_range=0.1)
    loss.backward()
    assert new.grad[:2].abs().max() == 0 and new.grad[2] != 0
    assert stats["diag/clipfrac"] == pytest.approx(2 / 3)
    assert stats["diag/approx_kl"] == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_kl_loss():
    m = torch.randn(2, 5, 4)
    assert grpo.kl_loss(m, m.clone(), torch.full((2, 1, 1), 0.3)).item() == 0.0
    kl = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5))
    assert kl.item() == pytest.approx(1 / (2 * 0.25))
    exact = grpo.kl_loss(torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.full((2, 1, 1), 0.5), dt=-0.1)
    assert exact.item() == pytest.approx(1 / (2 * 0.25 * 0.1))
