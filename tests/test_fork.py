"""The forker's view: the README's own reward and prompt files, written outside the repository exactly as the README
shows them and run as a user runs them (`python my_reward.py --images ... --reward ...`), on the tiny model with
the tiny judge and with an OpenAI-compatible judge on 127.0.0.1. No project file is edited."""

import json
import re
import runpy
import sys
from pathlib import Path

import pytest

import reward
from support.openai_server import completion, keys_asked

ROOT = Path(__file__).resolve().parents[1]  # the repository

README = (ROOT / "README.md").read_text()


def readme_file(name, folder):
    """The README's fenced block that opens with the comment `# name`, written to folder/name as shown."""
    block = next(b for b in re.findall(r"```\w*\n(.*?)```", README, re.S) if b.startswith(f"# {name}\n"))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block)
    return path


def run(script, argv, monkeypatch):
    """`python script argv...` in this process (an interpreter per run costs seconds of imports); the rewards it
    registers are removed again afterwards."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    monkeypatch.setattr(reward, "REWARDS", dict(reward.REWARDS))
    runpy.run_path(str(script), run_name="__main__")


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_programmatic_reward_from_the_readme(design_images, tmp_path, monkeypatch, tiny_flags):
    script = readme_file("my_reward.py", tmp_path / "mine")
    out = tmp_path / "out"
    run(
        script,
        [
            "--images",
            str(design_images),
            "--reward",
            "coverage",
            "--output_dir",
            str(out),
            "--layers",
            "2",
            "--max_train_steps",
            "2",
            "--sample_every",
            "0",
            *tiny_flags(),
        ],
        monkeypatch,
    )
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2] and all(x["train/skipped_updates"] == 0 for x in r)
    assert all(x["reward/mean"] == pytest.approx(x["coverage/mean"], abs=1e-6) for x in r)  # the reward is its own
    assert 0 < r[0]["coverage/mean"] < 1 and not any(k.startswith(("stage1/", "judge/")) for k in r[0])  # no judge


def test_judged_reward_and_criteria_from_the_readme_with_the_tiny_judge(
    design_images, tmp_path, monkeypatch, tiny_flags
):
    """With no judge named, @reward.uses_judge makes train.py build the default one (a local judge: here the tiny
    Qwen2.5-VL judge saved to a folder stands in for Qwen3.5-9B) and pass it to the reward; the penalty shows in the
    reward and the criteria file replaces the five criteria."""
    import tiny

    for part in tiny.tiny_judge(seed=0):
        part.save_pretrained(tmp_path / "judge")
    monkeypatch.setattr(reward, "DEFAULT_JUDGE", str(tmp_path / "judge"))
    script = readme_file("my_judged_reward.py", tmp_path / "mine")
    prompts = readme_file("my_prompts/criteria.txt", tmp_path / "mine").parent
    out = tmp_path / "judged"
    run(
        script,
        [
            "--images",
            str(design_images),
            "--reward",
            "vlm_minus_blank",
            "--prompts_dir",
            str(prompts),
            "--output_dir",
            str(out),
            "--layers",
            "2",
            "--max_train_steps",
            "1",
            "--sample_every",
            "0",
            *tiny_flags(),
        ],
        monkeypatch,
    )
    (row,) = rows(out)
    assert row["judge/answered"] == 4 + 1 and row["train/skipped_updates"] == 0
    assert {"stage1/text", "stage1/background", "blank/layers"} <= set(row) and "stage1/separation" not in row
    assert row["reward/mean"] == pytest.approx(row["stage2/score"] - 0.5 * row["blank/layers"], abs=1e-5)


def test_judged_reward_and_criteria_from_the_readme_with_an_http_judge(
    design_images, tmp_path, monkeypatch, tiny_flags, judge_server
):
    """The same two files against an OpenAI-compatible judge on 127.0.0.1 (--judge_url): the server is asked for the
    README's criteria, the groups are judged overlapped with the rollouts (the default), every request answered."""
    script = readme_file("my_judged_reward.py", tmp_path / "mine")
    prompts = readme_file("my_prompts/criteria.txt", tmp_path / "mine").parent
    asked = []

    def answer(body):
        keys = keys_asked(body)
        asked.append(keys)
        return 200, completion(json.dumps({k: 3 + i % 5 for i, k in enumerate(keys)}))

    out = tmp_path / "http"
    with judge_server(answer) as (server, url):
        run(
            script,
            [
                "--images",
                str(design_images),
                "--reward",
                "vlm_minus_blank",
                "--judge_url",
                url,
                "--judge_model",
                "judge-test",
                "--prompts_dir",
                str(prompts),
                "--output_dir",
                str(out),
                "--layers",
                "2",
                "--max_train_steps",
                "1",
                "--sample_every",
                "0",
                *tiny_flags(),
                "--images_per_step",
                "2",
            ],
            monkeypatch,
        )
    (row,) = rows(out)
    assert sorted(map(tuple, asked)) == sorted([("text", "background")] * 8 + [tuple("ABCD")] * 2)
    assert row["judge/answered"] == 5 and row["judge/fallbacks"] == 0  # the mean over the step's two groups
    assert row["stage1/text"] == pytest.approx(3.0) and row["stage1/background"] == pytest.approx(4.0)


def test_judged_reward_with_the_pipelines_own_text_encoder_as_judge(design_images, tmp_path, monkeypatch, tiny_flags):
    """--judge text_encoder (the pipeline's Qwen2.5-VL, kept instead of freed) serves a reward of your own too."""
    script = readme_file("my_judged_reward.py", tmp_path / "mine")
    out = tmp_path / "text_encoder"
    run(
        script,
        [
            "--images",
            str(design_images),
            "--reward",
            "vlm_minus_blank",
            "--judge",
            "text_encoder",
            "--output_dir",
            str(out),
            "--layers",
            "2",
            "--max_train_steps",
            "1",
            "--sample_every",
            "0",
            *tiny_flags(),
        ],
        monkeypatch,
    )
    (row,) = rows(out)
    assert row["judge/answered"] == 4 + 1 and {"stage1/separation", "blank/layers"} <= set(row)
