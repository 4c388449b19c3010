"""LayerD's protocol (layerd_protocol.py) and evaluate.py's layer-quality metrics: cases worked by hand, golden values
from LayerD's own code (test_layerd_golden.json), and LayerD's code itself where its package is importable. CPU, a few
seconds, no model.

    python -m pytest -q test_layerd.py
    # regenerate test_layerd_golden.json: run this file with LayerD's package importable (see `regenerate`)
    python test_layerd.py
"""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
from support import layerd as lp
from support import report
from support.images import pil_to_rgba, save_sample

GOLDEN = Path(__file__).with_name("test_layerd_golden.json")


# ------------------------------------------------------------------------------------- hand-made 10 x 10 layers
def square(color, top, left, bottom, right, alpha=255):
    x = np.zeros((10, 10, 4), np.uint8)
    x[top:bottom, left:right] = list(color) + [alpha]
    return x


BG = square((255, 255, 255), 0, 0, 10, 10)  # opaque white
A = square((255, 0, 0), 0, 0, 6, 6)  # red, 36 px
B = square((0, 255, 0), 3, 3, 9, 9)  # green, 36 px; 9 of them on A
AB = np.asarray(Image.alpha_composite(Image.fromarray(A), Image.fromarray(B)))  # B over A: 27 red + 36 green px
EMPTY = np.zeros((10, 10, 4), np.uint8)
A_LEFT, A_RIGHT = A.copy(), A.copy()
A_LEFT[:, 3:, 3], A_RIGHT[:, :3, 3] = 0, 0  # A cut into two disjoint parts
C = square((0, 0, 255), 7, 0, 10, 3)  # blue, 9 px, touches neither A nor B
K, W = square((0, 0, 0), 0, 0, 6, 6), square((255, 255, 255), 3, 3, 9, 9)  # A and B in black and white

# Pair costs, worked out once (rgb_l1 is over the second layer's pixels; transparent pixels hold (0, 0, 0)):
#   cost(A, AB)  = (15/63 + 1 - 36/63) / 2 = 1/3   (9 px red vs green 2/3, 27 px black vs green 1/3; IoU 36/63)
#   cost(B, AB)  = (9/63 + 1 - 36/63) / 2 = 2/7    (27 px black vs red 1/3)
#   cost(BG, AB) = (2/3 + 1 - 63/100) / 2;  cost(A, BG) = cost(B, BG) = (88/100 + 1 - 36/100) / 2
#   cost(AB, A)  = (6/36 + 1 - 36/63) / 2 = 25/84; cost(AB, B) = (0 + 1 - 36/63) / 2 = 3/14
#   cost(B, A)   = cost(A, B) = (15/36 + 1 - 9/63) / 2 = 107/168
# merge on the predicted side: DTW path (BG,BG) (A,AB) (B,AB); merging A, B gains 2 - (2/3 + 5/7) > 0 and gives
# exactly AB, after which both sides have 2 layers (no further merge)
HAND = {
    "identity": ([BG, A, B], [BG, A, B], [(0, 0, 0, 1)]),
    "merge on the predicted side": (
        [BG, A, B],
        [BG, AB],
        [(0, (0 + 1 / 3 + 2 / 7) / 3, (0 + 15 / 63 + 9 / 63) / 3, (1 + 36 / 63 + 36 / 63) / 3), (1, 0, 0, 1)],
    ),
    # path (BG,BG) (AB,A) (AB,B); the reference's A, B are merged (rgb now over the predicted layer's pixels)
    "merge on the reference side": (
        [BG, AB],
        [BG, A, B],
        [(0, (0 + 25 / 84 + 3 / 14) / 3, (0 + 6 / 36 + 0) / 3, (1 + 36 / 63 + 36 / 63) / 3), (1, 0, 0, 1)],
    ),
    # the two parts touch nothing above them: top-layer grouping composites them back into A before any edit
    "split into disjoint parts": ([BG, A_LEFT, A_RIGHT], [BG, A], [(0, 0, 0, 1)]),
    # swapped overlapping layers, no background: path (B,A) (A,B) (the diagonal wins the tie); 2 layers: no merge
    "swap": ([B, A], [A, B], [(0, 107 / 168, 15 / 36, 9 / 63)]),
    # B and C do not overlap: on both sides they form one group, and that composite does not depend on their order
    "swap of disjoint layers": ([BG, C, B], [BG, B, C], [(0, 0, 0, 1)]),
    # an empty layer touches nothing: it joins the top group, and compositing it changes no pixel
    "extra empty layer": ([BG, EMPTY, A, B], [BG, A, B], [(0, 0, 0, 1)]),
    # nothing on either side: rgb over no pixel is 0, the IoU of two empty alphas is 0 (LayerD's convention)
    "all empty": ([EMPTY, EMPTY], [EMPTY, EMPTY], [(0, 0.5, 0, 0)]),
    # swap with a background, colours black and white (every pixel difference is 0 or 1, so equal sums are equal
    # floats). Level 0, diagonal path: cost(W, K) = (9/36 + 1 - 9/63) / 2, cost(K, W) = (36/36 + 1 - 9/63) / 2.
    # Merging the swapped pair gains 13/14 on either side; on a tie LayerD merges the reference side: R = [BG, KW]
    # (W over K), path (BG,BG) (W,KW) (K,KW): rgb 0 and 36/63, IoU 36/63 twice. Then the predicted pair merges
    # (K over W): it differs from KW on the 9 px where they overlap: rgb 9/63, IoU 1
    "swap, equal gains": (
        [BG, W, K],
        [BG, K, W],
        [
            (0, (0 + 31 / 56 + 13 / 14) / 3, (0 + 1 / 4 + 1) / 3, (1 + 1 / 7 + 1 / 7) / 3),
            (1, (0 + 3 / 14 + 1 / 2) / 3, (0 + 0 + 4 / 7) / 3, (1 + 4 / 7 + 4 / 7) / 3),
            (2, (0 + 1 / 14) / 2, (0 + 1 / 7) / 2, 1),
        ],
    ),
}


@pytest.mark.parametrize("name", list(HAND))
def test_protocol_by_hand(name):
    pred, ref, expected = HAND[name]
    levels = lp.edit_levels(pred, ref)
    got = [(x["edits"], x["cost"], x["rgb_l1"], x["alpha_iou"]) for x in levels]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-9)


def test_grouping_alignment_and_aggregate_by_hand():
    alpha = np.stack([BG, A, B, C, EMPTY])[..., 3]
    # round 1: B, C, EMPTY overlap no later layer; round 2: A; round 3: BG; listed back to front
    assert lp.top_layer_groups(alpha) == [[0], [1], [2, 3, 4]]
    # DTW: D = [[1, 1, 3], [3, 1, 2]]; back from (1, 2) the diagonal (0, 1) = 1 ties (1, 1) = 1 and wins
    assert lp.dtw_path(np.array([[1.0, 0, 2], [2, 0, 1]])) == [(0, 0), (0, 1), (1, 2)]
    assert lp.dtw_path(np.zeros((2, 2))) == [(0, 0), (1, 1)]  # ties: the diagonal first
    # D = [[0, 1, 2], [1, 9, 1], [2, 1, 1]]: from (2, 2), (1, 2) and (2, 1) tie below the diagonal: (i - 1, j) first
    assert lp.dtw_path(np.array([[0.0, 1, 1], [1, 9, 0], [1, 0, 0]])) == [(0, 0), (0, 1), (1, 2), (2, 2)]
    one = [
        {"edits": 0, "cost": 0.5, "rgb_l1": 0.2, "alpha_iou": 0.4},
        {"edits": 1, "cost": 0.1, "rgb_l1": 0.0, "alpha_iou": 0.8},
    ]
    two = [{"edits": 0, "cost": 0.3, "rgb_l1": 0.4, "alpha_iou": 0.6}]  # no merge helped: level 1 = level 0
    agg = lp.aggregate([one, two])
    assert [(x["max_edits"], x["count"]) for x in agg] == [(0, 2), (1, 1)]
    assert [x["avg_edits"] for x in agg] == pytest.approx([0, 0.5])
    assert [x["avg_rgb_l1"] for x in agg] == pytest.approx([0.3, 0.2])
    assert [x["avg_alpha_iou"] for x in agg] == pytest.approx([0.5, 0.7])
    assert lp.edit_levels([BG, A, B], [BG, AB], max_edits=0) == lp.edit_levels([BG, A, B], [BG, AB])[:1]


# ----------------------------------------------------------------- randomly perturbed designs (golden and live)
def random_design(rng, size=24) -> list:
    """An opaque background and 1 to 7 rectangles / ellipses of random colour and alpha, some with a soft edge."""
    yy, xx = np.mgrid[:size, :size]
    bg = np.empty((size, size, 4), np.uint8)
    bg[..., :3], bg[..., 3] = rng.integers(0, 256, 3), 255
    layers = [bg]
    for _ in range(int(rng.integers(1, 8))):
        t, l = rng.integers(0, size - 3, 2)
        h, w = rng.integers(3, size // 2 + 3, 2)
        inside = (
            ((yy - t - h / 2) / (h / 2)) ** 2 + ((xx - l - w / 2) / (w / 2)) ** 2
            if rng.random() < 0.5
            else np.maximum(np.abs(yy - t - h / 2) / (h / 2), np.abs(xx - l - w / 2) / (w / 2)) ** 2
        )
        alpha = rng.integers(96, 256) * np.clip((1 - inside) * (4 if rng.random() < 0.5 else 100), 0, 1)
        x = np.zeros((size, size, 4), np.uint8)
        x[..., :3], x[..., 3] = rng.integers(0, 256, 3), alpha.round()
        x[x[..., 3] == 0] = 0
        layers.append(x)
    return layers


def perturb(rng, layers) -> list:
    """1 to 6 of the mistakes a decomposition makes: merge, split, shift, recolour, reorder, extra / empty layer,
    drop, fade, noise."""
    out = list(layers)
    H, W = out[0].shape[:2]
    for _ in range(int(rng.integers(1, 7))):
        kind, i = (
            rng.choice(["merge", "split", "shift", "recolour", "reorder", "extra", "empty", "drop", "fade", "noise"]),
            int(rng.integers(0, len(out))),
        )
        if kind in ("merge", "reorder") and len(out) > 1:
            i = min(i, len(out) - 2)
            out[i : i + 2] = (
                [np.asarray(Image.alpha_composite(*map(Image.fromarray, out[i : i + 2])))]
                if kind == "merge"
                else [out[i + 1], out[i]]
            )
        elif kind == "split":
            a, b, cut = out[i].copy(), out[i].copy(), int(rng.integers(1, W))
            a[:, cut:, 3], b[:, :cut, 3] = 0, 0
            out[i : i + 1] = [a, b]
        elif kind == "shift":
            out[i] = np.roll(out[i], tuple(int(v) for v in rng.integers(-H // 4, H // 4 + 1, 2)), (0, 1))
        elif kind == "recolour":
            out[i] = out[i].copy()
            out[i][..., :3] = np.clip(out[i][..., :3] + rng.integers(-80, 81, 3), 0, 255)
        elif kind in ("extra", "empty"):
            x = np.zeros((H, W, 4), np.uint8)
            if kind == "extra":
                t, l = rng.integers(0, H - 2, 2)
                x[t : t + int(rng.integers(2, H)), l : l + int(rng.integers(2, W))] = [
                    *rng.integers(0, 256, 3),
                    rng.integers(1, 256),
                ]
            out.insert(int(rng.integers(0, len(out) + 1)), x)
        elif kind == "drop" and len(out) > 2:
            out.pop(i)
        elif kind == "fade":
            out[i] = out[i].copy()
            out[i][..., 3] = out[i][..., 3] * rng.uniform(0.3, 1)
        elif kind == "noise":
            out[i] = np.clip(out[i].astype(int) + rng.integers(-20, 21, out[i].shape), 0, 255).astype(np.uint8)
    return out


def random_cases(seed=0, n=40, size=24) -> list:
    """[(pred, ref)]: a random design as the reference, perturbed as the prediction; in a third of the cases the
    reference is perturbed too (so merges happen on either side)."""
    rng, cases = np.random.default_rng(seed), []
    while len(cases) < n:
        ref = random_design(rng, size)
        pred = perturb(rng, ref)
        ref = perturb(rng, ref) if rng.random() < 1 / 3 else ref
        if len(pred) >= 2 and len(ref) >= 2:  # LayerD's tools/evaluate.py skips the others
            cases.append((pred, ref))
    return cases


def checksum(cases) -> str:
    h = hashlib.sha256()
    for pred, ref in cases:
        for x in pred + [None] + ref:
            h.update(b"|" if x is None else x.tobytes() + bytes(str(x.shape), "ascii"))
    return h.hexdigest()


def layerd_levels(pred, ref, max_edits=5):
    """LayerD's own code: LayersEditDist on RGBA PIL images, as its tools/evaluate.py calls it."""
    from layerd.evaluation import LayersEditDist

    return LayersEditDist(max_edits=max_edits)([Image.fromarray(x) for x in pred], [Image.fromarray(x) for x in ref])


def regenerate():
    """Write test_layerd_golden.json from LayerD's own code. Needs `import layerd.evaluation` to work: install LayerD
    (github.com/CyberAgentAILab/LayerD, Apache-2.0; the values here came from commit 6b95bc5), or put its src/ on
    PYTHONPATH, skip its layerd/__init__.py (it imports the decomposition model) and give its layerd/data/crello.py
    importable stand-ins for the renderer and inpainting modules it imports (the evaluation uses none of them);
    its evaluation needs numpy, pillow and scikit-image. Done that way on 2026-12-05 (numpy 2.4.6, pillow 13.0.0)."""
    from layerd.evaluation import LayersEditDist

    cases = random_cases()
    levels = [layerd_levels(pred, ref) for pred, ref in cases]
    GOLDEN.write_text(
        json.dumps(
            {
                "what": "LayerD's LayersEditDist(max_edits=5) on test_layerd.random_cases(seed=0, n=40, size=24), "
                "per case the score dicts of edit levels 0..edits used, then LayersEditDist.aggregate of all cases",
                "layerd_commit": "6b95bc5",
                "sha256_of_cases": checksum(cases),
                "levels": levels,
                "aggregate": LayersEditDist.aggregate(levels),
            },
            indent=1,
            default=float,
        )
    )
    print(f"wrote {GOLDEN}: {len(cases)} cases, edits used {np.bincount([len(x) - 1 for x in levels]).tolist()}")


def assert_levels_equal(ours, theirs, tol=1e-4):
    assert [x["edits"] for x in ours] == [x["edits"] for x in theirs]
    for x, y in zip(ours, theirs):
        for key in ("cost", "rgb_l1", "alpha_iou"):
            assert abs(x[key] - y[key]) <= tol, (x, y)


def test_equals_golden_values_from_layerds_code():
    golden = json.loads(GOLDEN.read_text())
    cases = random_cases()
    assert checksum(cases) == golden["sha256_of_cases"], (
        "random_cases() made other layers than the golden values were computed on (numpy or pillow changed?): "
        "regenerate them with `python test_layerd.py` where LayerD is importable"
    )
    ours = [lp.edit_levels(pred, ref) for pred, ref in cases]
    for x, y in zip(ours, golden["levels"]):
        assert_levels_equal(x, y)
    assert {len(x) - 1 for x in ours} >= {0, 1, 2, 3, 5}  # the cases use up to max_edits merges
    for x, y in zip(lp.aggregate(ours), golden["aggregate"]):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= 1e-4 for k in x)


def test_equals_layerds_own_code():
    pytest.importorskip("layerd.evaluation", reason="LayerD's package is not importable (test_layerd.regenerate)")
    cases = random_cases(seed=1, n=20)
    for k in range(6):  # synthetic designs of data.py, 48 px, perturbed
        _, layers = data.make_design(np.random.default_rng([9, k]), 2 + k % 4, (48, 40))
        cases.append(
            (perturb(np.random.default_rng(k), [np.asarray(x) for x in layers]), [np.asarray(x) for x in layers])
        )
    cases += [(p, r) for p, r, _ in HAND.values()]
    for pred, ref in cases:
        assert_levels_equal(lp.edit_levels(pred, ref), layerd_levels(pred, ref), tol=0)


# ------------------------------------------------------------------------- blank, duplicate, overlapping layers
def stack(*layers) -> torch.Tensor:
    return torch.stack([pil_to_rgba(Image.fromarray(x)) for x in layers])  # (N, 4, 10, 10)


def test_layer_quality_by_hand():
    faint = square((0, 0, 0), 0, 0, 10, 1, alpha=1)  # mean alpha 10 / 255 / 100 = 0.0004 < 0.001: blank
    q = ev.layer_quality(stack(BG, EMPTY, A, faint, B))
    # blank: EMPTY, faint; overlap of the foreground alphas: (36 + 36 + 10/255 - (63 + 4/255)) / (72 + 10/255),
    # the faint column's 4 px below A in the union
    assert (q["blank_layers"], q["duplicate_layers"]) == (2, 0)
    assert q["fg_overlap"] == pytest.approx((9 + 6 / 255) / (72 + 10 / 255))
    near = A.copy()
    near[..., 0][A[..., 3] > 0] = 250  # premultiplied: sum |diff| = 36 * 5/255 against sum max = 36 + 36
    far = A.copy()
    far[..., 0][A[..., 3] > 0] = 200  # 36 * 55/255 / 72 = 0.108 >= 0.05: a different layer
    q = ev.layer_quality(stack(BG, A, near, far))
    assert (q["blank_layers"], q["duplicate_layers"]) == (0, 1)  # near (0.0098 < 0.05), counted once
    assert q["fg_overlap"] == pytest.approx(2 / 3)  # three identical alphas: (3 - 1) / 3
    assert ev.layer_quality(stack(BG, A, C))["fg_overlap"] == 0  # disjoint
    assert ev.layer_quality(stack(BG, B))["fg_overlap"] == 0  # one foreground layer
    assert ev.layer_quality(stack(BG)[:0]) == {"blank_layers": 0, "duplicate_layers": 0, "fg_overlap": 0.0}


def test_evaluate_reports_layerd_levels_and_layer_quality(tmp_path, capsys):
    refs = tmp_path / "refs"
    data.write_references(refs, 3, seed=2, size=(32, 32), layer_counts=(3,))
    names = sorted(p.name for p in refs.iterdir())
    for run in ("copy", "edited"):
        for k, name in enumerate(names):
            layers = [Image.open(refs / name / f"layer_{i}.png") for i in range(3)]
            if run == "edited":  # 0: an empty and a duplicated layer added; 1: the top two merged; 2: one layer
                layers = (
                    [layers[0], Image.new("RGBA", (32, 32)), layers[1], layers[2], layers[2]]
                    if k == 0
                    else [layers[0], Image.alpha_composite(layers[1], layers[2])]
                    if k == 1
                    else layers[:1]
                )
            save_sample(tmp_path / run / name, layers[0], layers)
    out = tmp_path / "out"
    ev.main(
        [
            "--references",
            str(refs),
            "--predictions",
            str(tmp_path / "copy"),
            "--predictions",
            str(tmp_path / "edited"),
            "--output_dir",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    copy, edited = res["copy"]["3"], res["edited"]["3"]
    assert (copy["blank_fraction"], copy["duplicate_fraction"], copy["layerd_rgb_l1"]) == (0, 0, 0)
    assert copy["fg_overlap"] == copy["ref_fg_overlap"] == edited["ref_fg_overlap"]
    assert (edited["pred_layers"], edited["blank_layers"], edited["duplicate_layers"]) == (5 + 2 + 1, 1, 1)
    assert edited["blank_fraction"] == pytest.approx(1 / 8) and edited["layerd_n"] == 2  # one layer: skipped
    rows = {(r["run"], r["sample"]): r for r in csv.DictReader(open(out / "per_sample.csv"))}
    assert rows["edited", names[2]]["layerd_rgb_l1"] == "" and rows["edited", names[0]]["blank_layers"] == "1"
    scores = json.loads((out / "layerd_scores.json").read_text())
    levels = [
        lp.edit_levels(
            [np.asarray(Image.open(tmp_path / "edited" / s / f"layer_{i}.png")) for i in range(n)],
            [np.asarray(Image.open(refs / s / f"layer_{i}.png")) for i in range(3)],
        )
        for s, n in ((names[0], 5), (names[1], 2))
    ]
    assert scores["edited"] == lp.aggregate(levels) == edited["layerd"]  # one L: the run's and the L's aggregate
    assert float(rows["edited", names[1]]["layerd_alpha_iou"]) == levels[1][-1]["alpha_iou"]
    assert all(x["avg_rgb_l1"] == 0 and x["avg_alpha_iou"] == 1 for x in scores["copy"])
    assert "overlap" in table and "LayerD, edited: n=2 (1 with < 2 layers skipped)" in table
    bars = np.asarray(Image.open(out / "bars_L3.png"))
    xs = np.nonzero((bars == report.PALETTE[1]).all(-1))[1]  # the second run's bars: in both panels
    assert xs.min() < 60 + (2 * 22 + 26) * 4 < xs.max()
    ev.main(
        [
            "--references",
            str(refs),
            "--predictions",
            str(tmp_path / "edited"),
            "--output_dir",
            str(out),
            "--layerd_max_edits",
            "0",
        ]
    )
    assert all(len(s["layerd"]) == 1 for s in json.loads((out / "results.json").read_text())["edited"].values())
    with pytest.raises(SystemExit) as e:
        ev.main(["--references", str(refs), "--predictions", str(tmp_path / "copy"), "--layerd_max_edits", "-1"])
    assert e.value.code == 2 and "--layerd_max_edits -1" in capsys.readouterr().err


if __name__ == "__main__":
    regenerate()
