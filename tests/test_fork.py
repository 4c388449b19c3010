"""The forker's view: the README's reward and prompt files, written outside the repository exactly as the README shows
them, and the README's commands run as a user runs them: `python path/to/stable-layers/train.py ...` in a subprocess
whose working folder is outside the repository, with no PYTHONPATH, on the tiny model, with the tiny judge and with
an OpenAI-compatible judge on 127.0.0.1. No project file is edited."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import train
from support.openai_server import completion, keys_asked

ROOT = Path(__file__).resolve().parents[1]  # the repository
README = (ROOT / "README.md").read_text()
FORK = README.split("## Forking a reward", 1)[1].split("\n## ", 1)[0]  # the section


def readme_file(name, folder):
    """The README's fenced block that opens with the comment `# name`, written to folder/name as shown."""
    block = next(b for b in re.findall(r"```\w*\n(.*?)```", FORK, re.S) if b.startswith(f"# {name}\n"))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block)
    return path


def readme_commands():
    """The section's commands, as argv lists (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", FORK, re.S)
    return [shlex.split(line) for b in blocks for line in b.replace("\\\n", " ").splitlines() if line.strip()]


def command(fragment):
    return next(c for c in readme_commands() if fragment in " ".join(c))


def run(argv, cwd, images, out, extra=(), replace=None):
    """A README command run as written from `cwd` (outside the repository, no PYTHONPATH): `python` is this
    interpreter, path/to/stable-layers/ the repository, my_designs/ the test's images; `replace` swaps the named
    flags' values; `extra` adds the tiny model's flags and the output folder."""
    words = {"python": sys.executable, "my_designs/": str(images)}
    argv = [words.get(w, w.replace("path/to/stable-layers/", f"{ROOT}/")) for w in argv]
    for flag, value in (replace or {}).items():
        i = argv.index(flag)
        argv[i : i + 2] = [] if value is None else [flag, value]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [*argv, *extra, "--output_dir", str(out)],
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mine(tmp_path_factory):
    """A user's folder, far from the repository, holding the README's three files as shown."""
    folder = tmp_path_factory.mktemp("mine")
    for name in ("my_reward.py", "my_judged_reward.py", "my_prompts/criteria.txt"):
        readme_file(name, folder)
    assert not folder.resolve().is_relative_to(ROOT)
    return folder


def test_programmatic_reward_by_path_and_its_arguments(mine, design_images, tiny_flags):
    """--reward my_reward.py:coverage loads the file by path; --reward_args target=0.3 reaches it as a number."""
    flags = [*tiny_flags(layers=2, sample_every=0), "--max_train_steps", "1"]
    (row,) = run(command("--reward my_reward.py:coverage"), mine, design_images, mine / "out-a", flags)
    assert row["train/skipped_updates"] == 0 and 0 < row["coverage/mean"] < 1
    assert row["reward/mean"] == pytest.approx(row["coverage/mean"], abs=1e-6)  # the reward is its own
    assert not any(k.startswith(("stage1/", "judge/")) for k in row)  # no judge built
    (row,) = run(command("--reward_args target=0.3"), mine, design_images, mine / "out-b", flags)
    assert -1 < row["reward/mean"] <= -abs(row["coverage/mean"] - 0.3) + 1e-6  # -|alpha - 0.3|, mean over B


def test_judged_reward_with_an_http_judge_as_written(mine, design_images, tiny_flags, judge_server):
    """The README's judged-reward command, its flags as written (the served model's name included), against an
    OpenAI-compatible judge on 127.0.0.1: every request answered, the penalty in the reward."""

    def answer(body):
        keys = keys_asked(body)
        return 200, completion(json.dumps({k: 3 + i % 5 for i, k in enumerate(keys)}))

    argv = command("--reward my_judged_reward.py:vlm_minus_blank")
    model = argv[argv.index("--judge_model") + 1]
    with judge_server(answer, model=model) as (server, url):
        (row,) = run(
            argv,
            mine,
            design_images,
            mine / "out-http",
            [*tiny_flags(layers=2, sample_every=0), "--max_train_steps", "1"],
            replace={"--judge_url": url},
        )
    assert len(server.posts) == 4 + 1 and all(p["model"] == model for p in server.posts)
    assert row["judge/answered"] == 5 and row["judge/fallbacks"] == 0 and "blank/layers" in row
    assert row["reward/mean"] == pytest.approx(row["stage2/score"] - 0.5 * row["blank/layers"], abs=1e-5)


def test_judged_reward_and_criteria_with_the_tiny_judge(mine, design_images, tiny_flags):
    """The judged reward with the tiny judge in place of the served one, and the README's criteria folder: the judge
    answers the two criteria of my_prompts/criteria.txt, logged as stage1/<key>."""
    argv = command("--reward my_judged_reward.py:vlm_minus_blank")
    flags = [*tiny_flags(layers=2, sample_every=0), "--max_train_steps", "1"]
    (row,) = run(
        argv,
        mine,
        design_images,
        mine / "out-tiny",
        [*flags, "--judge", "tiny"],
        replace={"--judge_url": None, "--judge_model": None},
    )
    assert row["judge/answered"] == 4 + 1 and {"stage1/separation", "blank/layers"} <= set(row)
    (row,) = run(
        command("--prompts_dir my_prompts"), mine, design_images, mine / "out-prompts", [*flags, "--judge", "tiny"]
    )
    assert {"stage1/text", "stage1/background"} <= set(row) and "stage1/separation" not in row


def test_judged_reward_with_the_pipelines_own_text_encoder_as_judge(mine, design_images, tmp_path, tiny_flags):
    """--judge text_encoder (the pipeline's Qwen2.5-VL, kept instead of freed) serves a reward of your own too; in
    this process, the file loaded by path as on the command line."""
    train.main(
        [
            "--images",
            str(design_images),
            "--reward",
            f"{mine / 'my_judged_reward.py'}:vlm_minus_blank",
            "--judge",
            "text_encoder",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_train_steps",
            "1",
            *tiny_flags(layers=2, sample_every=0),
        ]
    )
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert row["judge/answered"] == 4 + 1 and {"stage1/separation", "blank/layers"} <= set(row)
