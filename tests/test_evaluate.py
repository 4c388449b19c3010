"""evaluate.py and data.py: per-layer L1 by hand, grouping and outputs, synthetic and Crello references, model mode."""

import csv
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
from support import tiny
from support.images import composite, over_white, pil_to_rgba

# ----------------------------------------------------------------------------- evaluate


def layer(H, W, color=(0, 0, 0), alpha=0.0, box=None):
    """(4, H, W): `color` with `alpha` inside box = (top, left, bottom, right) (everywhere when None), 0 elsewhere."""
    x = torch.zeros(4, H, W)
    t, l, b, r = box or (0, 0, H, W)
    x[:3, t:b, l:r] = torch.tensor(color, dtype=torch.float32).view(3, 1, 1)
    x[3, t:b, l:r] = alpha
    return x


WHITE = layer(10, 10, (1, 1, 1), 1.0)
RED_SQ = layer(10, 10, (1, 0, 0), 1.0, (1, 1, 5, 5))  # 16 px
RED_SHIFTED = layer(10, 10, (1, 0, 0), 1.0, (1, 3, 5, 7))  # same square, 2 px to the right; 8 px overlap
GREEN_SQ = layer(10, 10, (0, 1, 0), 1.0, (5, 5, 10, 10))  # 25 px, disjoint from RED_SQ


def test_red_square_shifted_by_hand():
    ref = torch.stack([WHITE, RED_SQ])
    image = ev.composite(ref)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SHIFTED])
    # 16 px differ (8 + 8 of the symmetric difference); over white each is |(1,0,0)-(1,1,1)| = 2/3 per channel-mean
    assert m["per_layer_l1"] == pytest.approx([0.0, 16 * (2 / 3) / 100])
    assert m["per_layer_alpha_l1"] == pytest.approx([0.0, 16 / 100])
    assert m["mean_l1"] == pytest.approx(16 * (2 / 3) / 100 / 2)
    assert m["recon_l1"] == pytest.approx(16 * (2 / 3) / 100)
    assert (m["missing_layers"], m["extra_layers"], m["resized"]) == (0, 0, False)
    # LayerD: identity matching; red square: 8 of 16 ref pixels see transparent black, |(0,0,0)-(1,0,0)| = 1/3;
    # soft IoU = 8 / 24; two layers a side cannot be merged
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 8 * (1 / 3) / 16) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 8 / 24) / 2)
    assert m["layerd_edits"] == 0
    same = ev.sample_metrics(ref, image, [WHITE, RED_SQ])
    assert same["mean_l1"] == 0 and same["recon_l1"] == 0 and same["layerd_alpha_iou"] == 1


def test_transparent_vs_opaque_by_hand():
    blue = layer(10, 10, (0, 0, 1), 1.0)
    ref = torch.stack([WHITE, blue])
    m = ev.sample_metrics(ref, ev.composite(ref), [WHITE, layer(10, 10)])
    # over white: (1,1,1) against (0,0,1) -> 2/3 everywhere; alpha 0 against 1
    assert m["per_layer_l1"] == pytest.approx([0.0, 2 / 3])
    assert m["per_layer_alpha_l1"] == pytest.approx([0.0, 1.0])
    assert m["recon_l1"] == pytest.approx(2 / 3)
    # LayerD groups the empty layer (it touches nothing) with the white one; that one group is aligned with both
    # reference layers: white vs white 0, white vs blue 2/3 on every pixel; IoU 1 and 1
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 2 / 3) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx(1.0)
    # the other way round: the reference layer is empty, the prediction opaque
    m2 = ev.sample_metrics(torch.stack([WHITE, layer(10, 10)]), WHITE, [WHITE, blue])
    assert m2["per_layer_l1"] == pytest.approx([0.0, 2 / 3])
    assert m2["layerd_rgb_l1"] == pytest.approx((0 + 2 / 3) / 2)  # both pred layers against the one ref group
    assert m2["layerd_alpha_iou"] == pytest.approx(1.0)


def test_missing_and_extra_layers_by_hand():
    ref = torch.stack([WHITE, RED_SQ, GREEN_SQ])
    image = ev.composite(ref)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SQ])  # the green layer is missing -> fully transparent
    assert m["per_layer_l1"] == pytest.approx([0, 0, 25 * (2 / 3) / 100])  # white vs (0,1,0): (1,0,1) -> 2/3
    assert m["per_layer_alpha_l1"] == pytest.approx([0, 0, 0.25])
    assert (m["missing_layers"], m["extra_layers"]) == (1, 0)
    assert m["recon_l1"] == pytest.approx(25 * (2 / 3) / 100)
    # LayerD groups ref red+green (they do not overlap): rgb over 41 px, 25 of them transparent black vs green (1/3);
    # IoU 16/41; no edit (two layers a side)
    assert m["layerd_edits"] == 0
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 25 * (1 / 3) / 41) / 2)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 16 / 41) / 2)

    blue = layer(10, 10, (0, 0, 1), 1.0)
    m = ev.sample_metrics(ref, image, [WHITE, RED_SQ, GREEN_SQ, blue])  # an extra opaque blue layer on top
    assert m["per_layer_l1"] == pytest.approx([0, 0, 0])  # extras are ignored per layer ...
    assert (m["missing_layers"], m["extra_layers"]) == (0, 1)
    assert m["recon_l1"] == pytest.approx(2 / 3)  # ... but hide everything in the reconstruction (all-blue image)
    # LayerD groups red+green on each side; the opaque blue is aligned with red+green too: rgb 2/3 on their 41 px,
    # IoU 41/100; merging it gains nothing
    assert m["layerd_edits"] == 0
    assert m["layerd_rgb_l1"] == pytest.approx((0 + 0 + 2 / 3) / 3)
    assert m["layerd_alpha_iou"] == pytest.approx((1 + 1 + 0.41) / 3)
    empty = ev.sample_metrics(ref, image, [])
    assert empty["missing_layers"] == 3 and empty["layerd_rgb_l1"] is None
    assert empty["recon_l1"] == pytest.approx((16 * 2 / 3 + 25 * 2 / 3) / 100)


def test_resize_is_bilinear_on_premultiplied_rgba():
    # reference 8x8: left half opaque red, right half transparent; prediction the same at 16x16, its transparent
    # half coloured green (invisible, but straight-alpha resizing would bleed it into the red edge)
    ref = layer(8, 8, (1, 0, 0), 1.0, (0, 0, 8, 4))
    pred = layer(16, 16, (0, 1, 0), 0.0)
    pred[:, :, :8] = layer(16, 16, (1, 0, 0), 1.0)[:, :, :8]
    out = ev.resize_rgba(pred, (8, 8))
    # antialiased bilinear, factor 2: weights (1/8, 3/8, 3/8, 1/8) -> alpha 1, 1, 1, 7/8, 1/8, 0, 0, 0 per row
    assert out[3, 0].tolist() == pytest.approx([1, 1, 1, 7 / 8, 1 / 8, 0, 0, 0])
    assert torch.allclose(out[:3, :, :5], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 8, 5))  # pure red
    m = ev.sample_metrics(ref[None], ev.composite(ref[None]), [pred])
    # columns 3 and 4 over white: (1, 1/8, 1/8) vs red and (1, 7/8, 7/8) vs white -> 1/12 each; 16 px of 64
    assert m["resized"] and m["per_layer_l1"] == pytest.approx([16 * (1 / 12) / 64])


def _copy_sample(src, dst, drop_last=False, extra=False, scale=1):
    dst.mkdir(parents=True)
    files = sorted(src.glob("layer_*.png"))
    for p in files[:-1] if drop_last else files:
        im = Image.open(p)
        im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(dst / p.name)
    if extra:
        Image.new("RGBA", Image.open(files[0]).size, (0, 0, 255, 255)).save(dst / f"layer_{len(files)}.png")


def test_grouping_counts_outputs_and_json(tmp_path, capsys):
    refs = tmp_path / "refs"
    data.write_references(refs, 6, seed=3, size=(40, 32), layer_counts=(2, 3, 4))
    names = sorted(p.name for p in refs.iterdir())
    for k, name in enumerate(names):  # run "copy": the references themselves; run "edited": k-dependent edits
        _copy_sample(refs / name, tmp_path / "copy" / name)
        _copy_sample(refs / name, tmp_path / "edited" / name, drop_last=k in (0, 3), extra=k == 1, scale=1 + (k == 2))
    ev.main(
        [
            "--references",
            str(refs),
            "--predictions",
            str(tmp_path / "copy"),
            "--predictions",
            f"mine={tmp_path / 'edited'}",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(res) == ["copy", "mine"] and all(list(r) == ["2", "3", "4"] for r in res.values())
    for run in res.values():
        for L, s in run.items():
            assert s["n"] == 2 and len(s["per_layer_l1"]) == int(L) == len(s["per_layer_alpha_l1"])
            assert {
                "mean_l1",
                "recon_l1",
                "missing_layers",
                "extra_layers",
                "layerd_rgb_l1",
                "layerd_alpha_iou",
            } <= set(s)
            assert s["mean_l1"] == pytest.approx(np.mean(s["per_layer_l1"]))
    assert all(s["mean_l1"] == 0 and s["recon_l1"] < 1 / 255 for s in res["copy"].values())
    # L of sample k is (2, 3, 4)[k % 3]: drops on k=0 (L=2) and k=3 (L=2), extra on k=1 (L=3), 2x size on k=2 (L=4)
    mine = res["mine"]
    assert (mine["2"]["missing_layers"], mine["3"]["extra_layers"], mine["4"]["samples_resized"]) == (2, 1, 1)
    assert mine["2"]["per_layer_l1"][0] == 0 and mine["2"]["per_layer_l1"][1] > 0
    assert mine["3"]["per_layer_l1"] == [0, 0, 0] and mine["3"]["recon_l1"] > 0.1  # the opaque blue extra
    assert 0 < mine["4"]["mean_l1"] < 0.05  # nearest 2x upscale, resized back
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_sample.csv")))
    assert len(rows) == 12 and {r["run"] for r in rows} == {"copy", "mine"}
    assert sum(int(r["missing_layers"]) for r in rows) == 2
    for L in (2, 3, 4):
        assert Image.open(tmp_path / "out" / f"bars_L{L}.png").width > 200
    assert Image.open(tmp_path / "out" / "samples.png").height >= 4 * 3 * 128  # 4 samples x (ref + 2 runs)
    table = capsys.readouterr().out
    assert "L=2 (n=2)" in table and "Pred 3" in table and "mine" in table


def test_synthetic_generator(tmp_path):
    a = data.write_references(tmp_path / "a", 6, seed=7, size=(48, 40))
    data.write_references(tmp_path / "b", 3, seed=7, size=(48, 40))
    Ls = [len(list((tmp_path / "a" / p).glob("layer_*.png"))) for p in sorted(x.split("/")[-1] for x in a)]
    assert Ls == [2, 3, 4, 2, 3, 4]  # balanced mix
    for k in range(3):  # same seed, same sample, whatever num_samples
        assert (tmp_path / "a" / f"synth_{k:04d}" / "image.png").read_bytes() == (
            tmp_path / "b" / f"synth_{k:04d}" / "image.png"
        ).read_bytes()
    img, layers = data.make_design(random.Random(0), 4, (48, 40))
    stack = torch.stack([pil_to_rgba(x) for x in layers])
    assert img.mode == "RGB" and img.size == (48, 40) and stack.shape == (4, 4, 40, 48)
    assert (stack[0, 3] == 1).all()  # opaque background
    assert all(0 < (s[3] > 0).float().mean() < 1 for s in stack[1:])  # every foreground layer partly visible
    recon = over_white(composite(stack))
    assert (recon - pil_to_rgba(img)[:3]).abs().max() <= 0.5 / 255 + 1e-6
    other, _ = data.make_design(random.Random(1), 4, (48, 40))
    assert np.abs(np.asarray(img, float) - np.asarray(other, float)).mean() > 5
    data.main(
        ["synthetic", str(tmp_path / "imgs"), "--num_samples", "3", "--size", "48x40", "--seed", "7", "--images_only"]
    )
    files = sorted((tmp_path / "imgs").iterdir())
    assert [f.name for f in files] == ["synth_0000.png", "synth_0001.png", "synth_0002.png"]
    assert files[1].read_bytes() == (tmp_path / "a" / "synth_0001" / "image.png").read_bytes()


def _element(color, left, top, width, height, angle=0.0, opacity=1.0):
    return {
        "image": Image.new("RGBA", (width, height), color + (255,)),
        "left": left,
        "top": top,
        "width": width,
        "height": height,
        "angle": angle,
        "opacity": opacity,
    }


def test_crello_elements_to_layers():
    els = [
        _element((0, 0, 255), 0, 0, 40, 30),
        _element((255, 0, 0), 2, 2, 5, 5),
        _element((0, 255, 0), 10, 2, 5, 5),  # group 1
        _element((255, 255, 0), 20, 2, 5, 5, opacity=0.5),
        _element((0, 0, 0), -3, 20, 6, 4),  # group 2
        _element((255, 0, 255), 25, 15, 10, 4, angle=math.pi / 2),
    ]  # group 3, rotated a quarter turn
    layers = data.elements_to_layers(els, (40, 30), max_layers=4)
    a = [np.asarray(x)[..., 3] for x in layers]
    assert len(layers) == 4 and all(x.size == (40, 30) for x in layers)
    assert (a[0] == 255).all() and (np.asarray(layers[0])[..., :3] == (0, 0, 255)).all()
    assert (a[1] > 0).sum() == 50 and a[1][2:7, 2:7].min() == 255 and a[1][2:7, 10:15].min() == 255
    assert (a[2] > 0).sum() == 25 + 3 * 4  # the half-transparent square and the part of the black box on the canvas
    assert a[2][2:7, 20:25].max() in (127, 128) and (a[2][20:24, 0:3] == 255).all()
    ys, xs = np.nonzero(a[3])  # 10x4 turned upright: 4 wide, 10 tall, about the same centre (30, 17)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (4, 10)
    assert abs(xs.mean() - 29.5) <= 0.5 and abs(ys.mean() - 16.5) <= 0.5
    assert len(data.elements_to_layers(els[:2], (40, 30))) == 2
    two = data.elements_to_layers(els, (40, 30), max_layers=2)  # all five foreground elements merged into one layer
    assert len(two) == 2 and (np.asarray(two[1])[..., 3] > 0).sum() == 50 + 25 + 12 + 40


def test_evaluate_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--references", str(tmp_path / "nope"), "--predictions", str(tmp_path)])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    data.write_references(tmp_path / "refs", 2, seed=0, size=(32, 32))
    (tmp_path / "preds" / "synth_0000").mkdir(parents=True)
    with pytest.raises(SystemExit):
        ev.main(["--references", str(tmp_path / "refs"), "--predictions", str(tmp_path / "preds")])
    assert "synth_0001" in capsys.readouterr().err
    (tmp_path / "preds" / "synth_0001").mkdir()
    shutil.copy(tmp_path / "refs" / "synth_0001" / "layer_0.png", tmp_path / "preds" / "synth_0001" / "layer_2.png")
    with pytest.raises(SystemExit):
        ev.main(
            [
                "--references",
                str(tmp_path / "refs"),
                "--predictions",
                str(tmp_path / "preds"),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert "without gaps" in capsys.readouterr().err
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            data.main(["crello", str(tmp_path / "crello")])
        assert "pip install datasets" in capsys.readouterr().err


def test_model_mode_base_and_lora_in_each_format(tmp_path):
    from diffusers import QwenImageLayeredPipeline
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    refs = tmp_path / "refs"
    data.write_references(refs, 2, seed=0, size=(64, 64), layer_counts=(2, 3))
    # one set of LoRA weights, written by peft itself (PEFT folder) and by diffusers (pytorch_lora_weights, with
    # lora_alpha in its metadata); lora_alpha != r, so a loader that drops alpha would give different layers
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    model = get_peft_model(tiny.tiny_pipeline().transformer, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # "gaussian" only draws lora_A; B starts at 0, which would leave outputs unchanged
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "peft_lora")
    state = {k.removeprefix("base_model.model."): v for k, v in get_peft_model_state_dict(model).items()}
    QwenImageLayeredPipeline.save_lora_weights(
        tmp_path / "diffusers_lora", transformer_lora_layers=state, transformer_lora_adapter_metadata=config.to_dict()
    )

    out = tmp_path / "out"
    ev.main(
        [
            "--references",
            str(refs),
            "--pretrained_model_name_or_path",
            "tiny",
            "--device",
            "cpu",
            "--base",
            "--lora",
            f"diffusers={tmp_path / 'diffusers_lora' / 'pytorch_lora_weights.safetensors'}",
            "--lora",
            f"peft={tmp_path / 'peft_lora'}",
            "--resolution",
            "64",
            "--num_inference_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    pred = {
        run: {
            s: np.stack([np.asarray(Image.open(out / "predictions" / run / s / f"layer_{i}.png")) for i in range(L)])
            for s, L in (("synth_0000", 2), ("synth_0001", 3))
        }
        for run in ("base", "diffusers", "peft")
    }
    for s in ("synth_0000", "synth_0001"):
        assert pred["base"][s].shape[1:] == (64, 64, 4)
        assert np.abs(pred["diffusers"][s].astype(int) - pred["base"][s]).mean() > 1  # the LoRA changes layers
        assert (pred["diffusers"][s] == pred["peft"][s]).all()  # the two formats are the same weights
    res = json.loads((out / "results.json").read_text())
    assert list(res) == ["base", "diffusers", "peft"] and res["diffusers"] == res["peft"] != res["base"]
    assert res["base"]["3"]["n"] == 1 and res["base"]["3"]["missing_layers"] == 0
    meta = json.loads((out / "predictions" / "peft" / "meta.json").read_text())
    assert meta["sampler"] == "heun" and len(meta["seconds_per_sample"]) == 2
    assert (meta["dtype"], meta["mixed_precision"]) == ("float32", "no")  # the CPU ran float32, whatever was asked
    # the saved predictions re-score to the same numbers without the model
    again = ev.evaluate(refs, {"base": out / "predictions" / "base"}, tmp_path / "again")
    assert again["base"] == res["base"]


def test_crello_example_fractions_and_pixels_agree():
    els = [_element((0, 0, 255), 0, 0, 40, 30), _element((255, 0, 0), 4, 6, 8, 6, opacity=0.8)]
    pixels = {k: [e[k] for e in els] for k in ("image", "left", "top", "width", "height", "angle", "opacity")}
    frac = dict(pixels, left=[0, 4 / 40], top=[0, 6 / 30], width=[1, 8 / 40], height=[1, 6 / 30])
    pixels["image"] = pixels["image"] + [None]  # an element without an image is skipped
    for key in ("left", "top", "width", "height", "angle", "opacity"):
        pixels[key] = pixels[key] + [0.0]
    a, size_a = data.crello_elements(pixels, 40, 30, longest_side=80)
    b, size_b = data.crello_elements(frac, 40, 30, longest_side=80)
    assert size_a == size_b == (80, 60) and len(a) == len(b) == 2
    la, lb = data.elements_to_layers(a, size_a), data.elements_to_layers(b, size_b)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(la, lb))
    alpha = np.asarray(la[1])[..., 3]
    assert (alpha > 0).sum() == 16 * 12 and alpha.max() == 204  # 8x6 box scaled 2x, opacity 0.8 * 255
