"""The rewards (reward.py): the grid's shuffle undone, the programmatic rewards' known answers, what the judge sees,
the command line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import reward
from support import pictures
from support.openai_server import completion, image_sent, keys_asked

KEYS = list(reward.load_prompts().criteria)


def _layers(g, n=3, h=24, w=32, seed=0):
    torch.manual_seed(seed)
    return torch.rand(g, n, 4, h, w)


def one_line_error(capsys, main, argv):
    """main(argv) stops with exit code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------- grid shuffle

COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 0, 255)]


def _coloured_group():
    """4 candidates, each with a white background layer and one big square of its own colour."""
    layers = torch.zeros(4, 2, 4, 32, 32)
    layers[:, 0] = 1.0
    for k, c in enumerate(COLORS):
        layers[k, 1, :3] = torch.tensor(c).view(3, 1, 1) / 255
        layers[k, 1, 3, 4:28, 4:28] = 1.0
    return [Image.new("RGB", (32, 32), (128, 128, 128))], layers


def test_grid_shuffle_rewards_follow_candidates_not_positions(judge_server, http_judge):
    quality = {0: 2, 1: 9, 2: 4, 3: 7}  # what the "seeing" judge thinks of each candidate

    def answer(body):
        keys = keys_asked(body)
        if keys == KEYS:
            return 200, completion(json.dumps({k: 5 for k in keys}))
        px = np.asarray(image_sent(body), np.int32)
        scores = {}
        for p, label in enumerate(keys):  # one panel per horizontal band; find its colour
            band = px[p * px.shape[0] // 4 : (p + 1) * px.shape[0] // 4].reshape(-1, 3)
            band = band[band.max(1) - band.min(1) > 150]
            votes = np.argmin(((band[:, None, :] - np.array(COLORS)[None]) ** 2).sum(-1), 1)
            scores[label] = quality[int(np.bincount(votes, minlength=4).argmax())] if mode[0] == "see" else 9 - p
        return 200, completion(json.dumps(scores))

    images, layers = _coloured_group()
    mode = ["see"]
    with judge_server(answer) as (_, url):
        judge = http_judge(url)
        orders = set()
        for seed in range(4):
            rewards, info = reward.vlm_reward(images, layers, 4, judge=judge, seed=seed)
            orders.add("".join(c["label"] for c in info["candidates"]))
            assert rewards.tolist() == [quality[k] for k in range(4)], (seed, info["candidates"])
        assert len(orders) > 1  # the seeds really moved the candidates around
        mode[0] = "position"  # a judge with pure position bias: A=9, B=8, ...
        by_seed = []
        for seed in range(4):
            rewards, info = reward.vlm_reward(images, layers, 4, judge=judge, seed=seed)
            assert rewards.tolist() == [9 - "ABCD".index(c["label"]) for c in info["candidates"]]
            by_seed.append(rewards)
        assert len({tuple(r.tolist()) for r in by_seed}) > 1  # the bias lands on different candidates


# ------------------------------------------------------------------------------ programmatic rewards


def test_programmatic_rewards_known_answers():
    white = Image.new("RGB", (8, 8), "white")
    layers = torch.zeros(4, 3, 4, 8, 8)  # 2 images x G=2, N=3
    layers[:, 0, 3] = 1.0  # opaque black background everywhere
    layers[0, 1, :, :, :] = 1.0  # candidate 0: opaque white layer 1 -> composite = white, exact
    layers[1, 1, :3], layers[1, 1, 3] = 1.0, 0.5  # candidate 1: white at alpha 0.5 over black -> 0.5 grey
    layers[2, 1, :3, :4], layers[2, 1, 3, :4] = 1.0, 1.0  # candidate 2: top half white
    layers[3, 1, :, :4] = 1.0
    layers[3, 2] = layers[3, 1]  # candidate 3: layer 2 duplicates layer 1
    r, info = reward.REWARDS["recon"]([white, white], layers, 2, judge="ignored", seed=1)
    assert r.tolist() == pytest.approx([0.0, -0.5, -0.5, -0.5]) and info["recon/l1"] == pytest.approx(0.375)
    r, info = reward.REWARDS["layer_usage"]([white, white], layers, 2, judge="ignored", seed=1)
    assert r.tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, -1 / 3])  # 0-2: layer 2 blank; 3: duplicate
    assert info["layer_usage/blank"] == pytest.approx(0.75) and info["layer_usage/duplicate"] == pytest.approx(0.25)
    layers[2, 2, :3, 4:], layers[2, 2, 3, 4:] = 0.2, 1.0  # candidate 2 fills layer 2 with other content
    assert reward.REWARDS["layer_usage"]([white, white], layers, 2)[0][2] == 0.0
    with pytest.raises(ValueError, match="group_size"):
        reward.REWARDS["recon"]([white], layers, 2)


def test_render_panel_and_grid():
    layers = torch.zeros(2, 2, 4, 16, 16)
    layers[:, 0, 0], layers[:, 0, 3] = 1.0, 1.0  # opaque red background; layer 1 fully transparent
    panel = np.asarray(pictures.render_candidate_panel(Image.new("RGB", (16, 16), "blue"), layers[0], tile=64))
    assert panel.shape[1] == 2 + 3 * (64 + 2)  # pad + 3 tiles of 64 (+2 px gaps), no label column
    y = 2 + 10 + 32  # middle of the tiles
    assert tuple(panel[y, 2 + 32]) == (0, 0, 255) and tuple(panel[y, 2 + 66 + 32]) == (255, 0, 0)
    checker = panel[2 + 10 : 2 + 10 + 64, 2 + 2 * 66 : 2 + 2 * 66 + 64].reshape(-1, 3)
    assert {tuple(v) for v in np.unique(checker, axis=0)} == {(204, 204, 204), (255, 255, 255)}
    captioned = pictures.render_candidate_panel(Image.new("RGB", (16, 16)), layers[0], "A", "r=5.0\nok", tile=64)
    assert captioned.height > panel.shape[0] and captioned.width == panel.shape[1] + 16
    grid = pictures.render_group_grid(Image.new("RGB", (16, 16)), layers, ["A", "B"], tile=64)
    assert grid.size == (captioned.width, 2 * (panel.shape[0]) + 4)


# ------------------------------------------------------------------------------------------------- CLI


def _write_layout(root, g=4):
    """rollout.py's layout: root/<stem>/image.png, root/<stem>/candidate_<kk>/layer_<i>.png."""
    group = root / "poster"
    group.mkdir(parents=True)
    Image.new("RGB", (24, 16), (250, 250, 250)).save(group / "image.png")
    for k in range(g):
        (group / f"candidate_{k:02d}").mkdir()
        for i in range(2):
            a = np.zeros((16, 24, 4), np.uint8)
            a[..., :3], a[..., 3] = (250, 250, 250) if k == 0 else (40 * k, 0, 0), 255 if i == 0 else 0
            Image.fromarray(a, "RGBA").save(group / f"candidate_{k:02d}" / f"layer_{i}.png")


def test_cli_prints_scores_and_saves_what_the_judge_saw(tmp_path, capsys):
    _write_layout(tmp_path / "out")
    reward.main(["--decompositions", str(tmp_path / "out"), "--judge", "tiny", "--output_dir", str(tmp_path / "v")])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    header = next(line for line in lines if line[:2] == ["group", "cand"])
    assert header[2] == "label" and {"stage1", "stage2", "reward", "fallback", *KEYS} <= set(header)
    rows = [line for line in lines if line and line[0] == "poster"]
    assert [r[1] for r in rows] == ["00", "01", "02", "03"]
    assert all(1 <= float(r[header.index("reward")]) <= 9 for r in rows)
    with Image.open(tmp_path / "v" / "poster" / "stage2_grid_00.png") as grid:
        assert max(grid.size) <= 128
    reward.main(["--decompositions", str(tmp_path / "out"), "--reward", "recon"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["poster"]]
    assert [float(r[-1]) for r in rows][0] == 0.0 and all(float(r[-1]) < -0.1 for r in rows[1:])


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    err = one_line_error(capsys, reward.main, ["--decompositions", str(tmp_path / "missing")])
    assert "error: --decompositions" in err and "no such folder" in err
    (tmp_path / "empty" / "x").mkdir(parents=True)
    err = one_line_error(capsys, reward.main, ["--decompositions", str(tmp_path / "empty"), "--reward", "recon"])
    assert "no <stem>/image.png" in err
    with pytest.raises(ValueError, match="needs judge="):
        reward.vlm_reward([Image.new("RGB", (8, 8))], _layers(2), 2)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in ("criteria", "stage1", "stage2"):
        (prompts / f"{name}.txt").write_text((reward.PROMPTS_DIR / f"{name}.txt").read_text())
    (prompts / "stage2.txt").write_text("Score {candidates}: {answer_format}")
    with pytest.raises(ValueError, match=r"stage2.txt: placeholders"):
        reward.load_prompts(prompts)


def test_reward_args_reach_the_vlm_reward_and_a_typo_is_one_line(tmp_path, capsys):
    """--reward_args passes the VLM reward's own options (combine, weights) from the command line, the same flag
    train.py has; an argument the reward does not take is named in one line with the ones it does."""
    _write_layout(tmp_path / "out")
    argv = ["--decompositions", str(tmp_path / "out"), "--judge", "tiny"]
    reward.main([*argv, "--reward_args", "combine=stage1", "weights=separation=3,alpha=1"])
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    header = next(line for line in lines if line[:2] == ["group", "cand"])
    for row in (line for line in lines if line and line[0] == "poster"):
        scores = {k: float(row[header.index(k)]) for k in KEYS}
        total = (3 * scores["separation"] + sum(scores.values()) - scores["separation"]) / (3 + len(KEYS) - 1)
        assert row[header.index("stage2")] == "-"  # stage1: no grid asked for
        assert float(row[header.index("reward")]) == pytest.approx(total, abs=2e-3)  # the table rounds to 3 places
    err = one_line_error(capsys, reward.main, [*argv, "--reward_args", "combin=mean"])
    assert "--reward_args combin: --reward vlm takes none such; its arguments: ['weights', 'combine'" in err
