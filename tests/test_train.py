"""train.py's loop as a user meets it: an OpenAI-compatible judge on 127.0.0.1 (overlapped and serial, one that
answers nothing), bad input, out of memory, the departures table, the trackers, one run per folder."""

import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import grpo
import reward
import rollout
import train
from support import judges, openai_server, runfolder
from support.checkpoints import write_model_card
from support.openai_server import completion, image_sent, keys_asked

ROOT = Path(__file__).resolve().parents[1]  # the repository
KEYS = list(reward.load_prompts().criteria)


def test_train_with_http_judge_url_alone(image_dir, tmp_path, monkeypatch, tiny_flags, judge_server):
    """The real loop against an OpenAI-compatible judge on 127.0.0.1, chosen by --judge_url alone: G + 1 requests
    per group, no failure, the grid's scores (which differ per label) become rewards with a spread; the model card
    names the base model and carries no secret from the environment."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-in-env-42")

    def answer(body):
        keys = keys_asked(body)
        scores = {k: 7 for k in keys} if keys == KEYS else {k: 2 + 2 * i for i, k in enumerate(keys)}
        return 200, completion(json.dumps(scores))

    with judge_server(answer) as (server, url):
        train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path),
                "--judge_url",
                url,
                "--judge_model",
                "judge-test",
                "--layers",
                "2",
                "--max_train_steps",
                "1",
                "--sample_every",
                "1",
                *tiny_flags(),
            ]
        )
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["judge/requests"] == 4 + 1 and record["judge/fallbacks"] == 0
    assert record["stage1/total"] == pytest.approx(7.0) and record["reward/std"] > 1.0
    assert (tmp_path / "samples" / "step-000001.png").is_file()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
    assert {"lora", "stable-layers", "flow-grpo", "qwen-image-layered"} <= set(card.data.tags)
    text = (tmp_path / "README.md").read_text()
    assert "tiny.tiny_pipeline()" in text and "samples/step-000001.png" in text  # a base built in code: how to load
    assert 'from_pretrained("tiny")' not in text  # ... not a hub id that cannot load
    (tmp_path / "hub").mkdir()
    write_model_card(tmp_path / "hub", train.parse_args(["--images", "."]), {"step": 3})  # the released base
    hub_text = (tmp_path / "hub" / "README.md").read_text()
    assert 'from_pretrained("Qwen/Qwen-Image-Layered"' in hub_text and "PeftModel.from_pretrained" in hub_text
    assert "sk-secret-in-env-42" not in text and url in text
    assert ModelCard.load(tmp_path / "checkpoint-1" / "README.md").data.base_model == "tiny"
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--images", ".", "--judge", "local", "--judge_url", url])
    assert e.value.code == 2


def expected_digit(top_logprobs):
    """E[d] over the digit tokens 1..9 of a top_logprobs list (spaces stripped), renormalised: what a judge that reads
    logprobs must take for that score, computed here apart from support/judges.py."""
    mass = {}
    for t in top_logprobs:
        tok = t["token"].strip()
        if tok.isdigit() and len(tok) == 1 and tok != "0":
            mass[int(tok)] = mass.get(int(tok), 0.0) + math.exp(t["logprob"])
    return sum(d * p for d, p in mass.items()) / sum(mass.values())


def test_a_server_that_returns_logprobs_as_vllm_does_gives_the_expected_scores(
    image_dir, tmp_path, tiny_flags, judge_server
):
    """One train.py step against a loopback server answering as vLLM does when asked for `logprobs`/`top_logprobs`
    (each token with its logprob, bytes and top alternatives, digits as " 7" or "7"): every score the loop uses is
    the expectation over the digits' top_logprobs, computed here apart from the judge's code, never the integer
    written in the answer (which differs from it in every case here)."""
    top = {  # the top alternatives of each score digit: the written digit is the most probable one
        "A": {"6": 0.5, "7": 0.3, " 8": 0.2},
        "B": {"3": 0.6, " 4": 0.25, "9": 0.15},
        "C": {"5": 0.4, "4": 0.35, "2": 0.25},
        "D": {"8": 0.7, "9": 0.2, "1": 0.1},
    }
    for i, key in enumerate(KEYS):  # stage 1: criterion i gets a spread of its own
        top[key] = {str(3 + i): 0.55, str(4 + i): 0.3, f" {5 + i}": 0.15}
    written = {k: int(max(d, key=d.get)) for k, d in top.items()}
    expected = {
        k: expected_digit([{"token": t, "logprob": math.log(p)} for t, p in d.items()]) for k, d in top.items()
    }
    assert all(abs(expected[k] - written[k]) > 0.2 for k in top)  # a fallback to the integers cannot pass below

    def answer(body):
        assert body["logprobs"] is True and body["top_logprobs"] >= 3  # the judge asks for them
        keys = keys_asked(body)
        return 200, openai_server.vllm_completion({k: written[k] for k in keys}, top, model="Qwen/Qwen3.5-9B")

    with judge_server(answer, model="Qwen/Qwen3.5-9B") as (server, url):
        train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path),
                "--judge_url",
                url,
                "--judge_model",
                "Qwen/Qwen3.5-9B",
                "--layers",
                "2",
                "--max_train_steps",
                "1",
                *tiny_flags(sample_every=0),
            ]
        )
    assert len(server.posts) == 4 + 1
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["judge/fallbacks"] == 0 and row["judge/answered"] == 5
    for key in KEYS:  # every candidate got the same stage-1 answer: its mean is the expectation itself
        assert row[f"stage1/{key}"] == pytest.approx(expected[key], abs=1e-6)
    calibrated = [expected[k] for k in "ABCD"]  # each candidate's reward is its letter's expectation
    assert row["reward/mean"] == pytest.approx(np.mean(calibrated), abs=1e-6)
    assert row["reward/std"] == pytest.approx(np.std(calibrated), abs=1e-6)


def test_a_judge_that_answers_nothing_stops_the_run_and_resume_continues(
    image_dir, tmp_path, monkeypatch, capsys, tiny_flags, peft_weights, judge_server
):
    """A judge that answers HTTP 500 to every request from step 2 on: steps 2 and 3 are not trained (no optimizer
    step, no checkpoint), and with --judge_max_failed_steps 2 the run stops after step 3 with one line naming the
    judge, its last error and the checkpoint; once the judge is back, --resume_from_checkpoint latest ends where a
    run with a healthy judge ends, bit for bit."""
    monkeypatch.setattr(judges.time, "sleep", lambda seconds: None)  # the client's retry back-off: no waiting here
    down_from = {"step": None}

    def answer(body):
        if down_from["step"] is not None and len(server.posts) > down_from["step"]:
            return 500, {"error": {"message": "model crashed"}}
        keys = keys_asked(body)  # stage 1: 7 each; stage 2: by grid position, which (seed, step) shuffles
        return 200, completion(
            json.dumps({k: 7 for k in keys} if keys == KEYS else {k: 2 + 2 * i for i, k in enumerate(keys)})
        )

    common = [
        "--reward",
        "vlm",
        "--judge_model",
        "judge-test",
        "--images",
        str(image_dir),
        "--layers",
        "2",
        "--sample_every",
        "0",
        "--checkpointing_steps",
        "1",
        "--max_train_steps",
        "3",
        "--learning_rate",
        "1e-2",
        *tiny_flags(),
    ]
    with judge_server(answer) as (server, url):
        train.main([*common, "--judge_url", url, "--output_dir", str(tmp_path / "healthy"), "--no-judge_overlap"])
        server.posts.clear()
        down_from["step"] = 5  # step 1's G + 1 = 5 requests are answered, then the judge fails
        with pytest.raises(SystemExit) as e:
            train.main(
                [*common, "--judge_url", url, "--output_dir", str(tmp_path / "down"), "--judge_max_failed_steps", "2"]
            )
        err = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]  # not the bar, not a skip
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: the judge")
        assert f"judge-test @ {url}" in err[0] and "HTTP 500" in err[0] and "steps 2..3" in err[0]
        assert "checkpoint-1" in err[0] and "--resume_from_checkpoint latest" in err[0]
        assert [p.name for p in runfolder.checkpoints(tmp_path / "down")] == ["checkpoint-1"]
        rows = [json.loads(line) for line in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]  # step 2 logged (not trained); step 3 stopped the run
        assert rows[1]["judge/answered"] == 0 and rows[1]["train/skipped_updates"] == 1
        assert rows[1]["train/grad_norm"] == 0.0 and rows[0]["judge/answered"] == 5
        down_from["step"] = None  # the judge is back
        train.main(
            [*common, "--judge_url", url, "--output_dir", str(tmp_path / "down"), "--resume_from_checkpoint", "latest"]
        )
    a, b = peft_weights(tmp_path / "healthy"), peft_weights(tmp_path / "down")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (tmp_path / "down" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]


def test_train_bad_input(tmp_path, capsys, tiny_flags):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(empty), "--output_dir", str(tmp_path / "out"), "--reward", "recon", *tiny_flags()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no readable image" in err and "Traceback" not in err
    for argv, message in [
        (["--group_size", "1"], "--group_size must be >= 2"),
        (["--sde_window", "20"], "--sde_window must be in 0..3"),
        (["--judge_concurrency", "0"], "--judge_concurrency must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--images", str(empty), *tiny_flags(), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(empty), "--output_dir", str(tmp_path / "out"), "--reward", "nope", *tiny_flags()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--reward nope: choose one of vlm, recon" in err and err.count("\n") == 1


def test_judge_overlap_gives_the_serial_loop_exactly(image_dir, tmp_path, tiny_flags, peft_weights, judge_server):
    """An HTTP judge on loopback with delays and failures (the first answer for some pictures is HTTP 500): each
    group judged in a thread while the next is rolled out gives the same LoRA and the same metrics as judging
    after each rollout in the main thread."""
    import hashlib

    seen, lock = set(), threading.Lock()

    def answer(body):
        time.sleep(0.05)
        digest = hashlib.sha1(image_sent(body).tobytes()).digest()
        with lock:
            first = digest not in seen
            seen.add(digest)
        if first and digest[0] % 4 == 0:
            return 500, {"error": "overloaded"}
        keys = keys_asked(body)
        return 200, completion(json.dumps({k: 1 + (digest[i] % 9) for i, k in enumerate(keys)}))

    out = {}
    with judge_server(answer) as (server, url):
        for mode in ("--judge_overlap", "--no-judge_overlap"):
            seen.clear()
            out[mode] = tmp_path / mode.strip("-")
            train.main(
                [
                    "--images",
                    str(image_dir),
                    "--output_dir",
                    str(out[mode]),
                    "--judge_url",
                    url,
                    "--judge_model",
                    "judge-test",
                    "--layers",
                    "2",
                    "--max_train_steps",
                    "2",
                    "--sample_every",
                    "0",
                    *tiny_flags(),
                    "--images_per_step",
                    "2",
                    mode,
                ]
            )
    rows = {
        m: [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "mem/"))}
            for line in (o / "metrics.jsonl").read_text().splitlines()
        ]
        for m, o in out.items()
    }
    assert rows["--judge_overlap"] == rows["--no-judge_overlap"]
    assert (
        sum(r["judge/retries"] for r in rows["--judge_overlap"]) > 0 and rows["--judge_overlap"][0]["reward/std"] > 0
    )
    a, b = (peft_weights(o) for o in out.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overlapped_judge_spans_the_groups_and_the_update_follows_the_last_answer(
    image_dir, tmp_path, monkeypatch, tiny_flags, peft_weights, judge_server
):
    """Overlapped, a step's groups are with the judge at once (the default bound on requests in flight is a step's,
    so no group waits for a slot; --judge_concurrency caps it) and the update starts after the last answer (the
    advantages need every reward, with either --adv_std); the LoRA equals judging after each rollout."""
    answered, started, in_flight, lock = [], [], [0, 0], threading.Lock()  # in_flight: now, most
    real = rollout.step_log_prob

    def step_log_prob(*a, **k):
        started.append(time.monotonic())
        return real(*a, **k)

    def answer(body):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
        time.sleep(0.5)
        with lock:
            in_flight[0] -= 1
        answered.append(time.monotonic())
        return 200, completion(json.dumps({k: 1 + (len(k) + i) % 9 for i, k in enumerate(keys_asked(body))}))

    monkeypatch.setattr(rollout, "step_log_prob", step_log_prob)
    with judge_server(answer) as (server, url):
        for adv_std in ("group", "global"):
            for mode in ("--judge_overlap", "--no-judge_overlap"):
                answered.clear(), started.clear()
                in_flight[1] = 0
                train.main(
                    [
                        "--images",
                        str(image_dir),
                        "--output_dir",
                        str(tmp_path / adv_std / mode),
                        "--judge_url",
                        url,
                        "--judge_model",
                        "judge-test",
                        "--layers",
                        "2",
                        "--max_train_steps",
                        "1",
                        "--sample_every",
                        "0",
                        *tiny_flags(),
                        "--images_per_step",
                        "3",
                        "--adv_std",
                        adv_std,
                        mode,
                    ]
                )
                assert len(answered) == 3 * 5 and started[0] > max(answered)  # 3 groups: 4 panels and a grid each
                assert in_flight[1] > 5 if mode == "--judge_overlap" else in_flight[1] == 5
            a, b = (peft_weights(tmp_path / adv_std / m) for m in ("--judge_overlap", "--no-judge_overlap"))
            assert all(torch.equal(a[k], b[k]) for k in a)
        in_flight[1] = 0
        train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path / "bound"),
                "--judge_url",
                url,
                "--judge_model",
                "judge-test",
                "--layers",
                "2",
                "--max_train_steps",
                "1",
                "--sample_every",
                "0",
                *tiny_flags(),
                "--images_per_step",
                "2",
                "--judge_concurrency",
                "3",
            ]
        )
        assert in_flight[1] == 3


def test_train_errors_bad_input_one_line_bugs_keep_their_traceback(
    image_dir, tmp_path, monkeypatch, capsys, tiny_flags
):
    """Bad input (a missing folder, --sde_window = T, --images_per_step not a multiple of the ranks) is one line
    and exit 2; an exception raised by a (forked) reward inside the loop reaches the top with its traceback."""
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(tmp_path / "nope"), "--reward", "recon", *tiny_flags()])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--images", ".", "--num_inference_steps", "4", "--sde_window", "4"])
    assert e.value.code == 2 and "last step" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in my reward")

    monkeypatch.setitem(reward.REWARDS, "broken", broken)
    with pytest.raises(RuntimeError, match="shape mismatch in my reward"):
        train.main(
            ["--images", str(image_dir), "--output_dir", str(tmp_path / "out"), "--reward", "broken", *tiny_flags()]
        )


def test_out_of_memory_gives_one_actionable_line(image_dir, tmp_path, monkeypatch, capsys, tiny_flags):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "policy_update", oom)
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(image_dir), "--output_dir", str(tmp_path), "--reward", "recon", *tiny_flags()])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert e.value.code == 2 and err.startswith("error: CUDA out of memory")
    assert "during the update" in err and "--train_batch_size 1" in err and "--resume_from_checkpoint" in err


def test_cps_with_the_kl_trains_every_step_and_window_0_stops_before_the_last(image_dir, tmp_path, tiny_flags):
    """CPS has std 0 on the last step (sigma_next = 0): the window never holds it, so the KL stays finite and no
    update is skipped; --sde_window 0 trains steps 0..T-2."""
    train.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path),
            "--reward",
            "recon",
            "--layers",
            "2",
            "--sde_type",
            "cps",
            "--noise_level",
            "0.7",
            "--beta",
            "0.04",
            "--sde_window",
            "0",
            "--clip_range",
            "1e-5",
            "--max_train_steps",
            "2",
            "--sample_every",
            "0",
            *tiny_flags(),
        ]
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["window"] for r in records] == [[0, 3], [0, 3]]  # T = 4: steps 0, 1, 2
    assert all(r["train/skipped_updates"] == 0 and math.isfinite(r["loss/kl"]) for r in records)
    assert records[1]["loss/kl"] > 0  # after one update the policy has left the reference


def test_advantages_use_upstream_global_std_over_the_step():
    """Two images, the second with near-equal rewards: upstream centres per image and divides by the std of all
    the step's rewards, which keeps the near-tie small; the per-group std blows it up to +-1."""
    r = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.001], dtype=np.float32)
    groups = r.reshape(2, 4)
    upstream = ((groups - groups.mean(1, keepdims=True)) / (r.std() + 1e-4)).reshape(-1)  # np.std: ddof 0
    ours = grpo.group_advantages(torch.tensor(r), 4, global_std=True)
    np.testing.assert_allclose(ours.numpy(), np.clip(upstream, -5, 5), rtol=0, atol=1e-6)
    assert ours[4:].abs().max() < 1e-3
    per_group = grpo.group_advantages(torch.tensor(r), 4, global_std=False)
    assert per_group[7].item() == pytest.approx(0.75 * 0.001 / (np.std(r[4:]) + 1e-4), rel=1e-3)
    assert per_group[4:].abs().max() > 1.0
    assert train.parse_args(["--images", "."]).adv_std == "global" == train.UPSTREAM["adv_std"]


def departures():
    """train.py's docstring list of departures, `  setting: upstream -> here. Why.` (continued on indented lines):
    {setting: (upstream, here, why)}."""
    entries, doc = {}, train.__doc__.split("Every departure", 1)[1]
    for line in doc.splitlines():
        if m := re.match(r"^  (\S[^:]*): (.+?) -> (.+?)\. (.*)$", line):
            entries[m[1]] = [m[2], m[3], m[4]]
        elif line.startswith("      ") and entries:
            entries[list(entries)[-1]][2] += " " + line.strip()
    return entries


def test_departures_table_is_the_defaults():
    """The departures listed in train.py's docstring are the truth: every flag with an upstream value either keeps
    it as its default or has an entry whose upstream and here values are upstream's value and the default;
    docs/training.md's table has the same rows, word for word."""
    rows = departures()
    assert len(rows) >= 8 and "--beta" in rows and "advantage groups" in rows
    args = train.parse_args(["--images", "."])
    for flag, upstream in train.UPSTREAM.items():
        default = getattr(args, flag)
        if default == upstream:
            assert f"--{flag}" not in rows, f"--{flag} keeps upstream's {upstream} but has a row"
        else:
            assert rows.get(f"--{flag}", [])[:2] == [str(upstream), str(default)], f"--{flag}: {default} vs {upstream}"
    assert all(name in {f"--{f}" for f in train.UPSTREAM} for name in rows if name.startswith("--"))
    table = (ROOT / "docs" / "training.md").read_text()
    for name, (upstream, here, why) in rows.items():
        setting = f"`{name}`" if name.startswith("--") else name
        row = f"| {setting} | {upstream} | {here} | {why[0].lower() + why[1:].removesuffix('.')} |"
        assert row in table, row


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc.Tags()["images"]


def test_report_to_tensorboard_matches_metrics_jsonl(image_dir, tmp_path, tiny_flags):
    train.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path),
            "--reward",
            "recon",
            "--layers",
            "2",
            "--max_train_steps",
            "2",
            "--sample_every",
            "2",
            *tiny_flags(),
            "--report_to",
            "tensorboard",
        ]
    )
    scalars, images = _tensorboard_scalars(tmp_path / "logs")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ["reward/mean", "loss/policy", "diag/ratio_mean", "recon/l1", "time/train_s"]:
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in records], key
    assert images == ["samples/group"]


def _wandb_history(run_file):
    """The history rows of an offline wandb run file: a LevelDB-style log (7-byte header, 32 KiB blocks of records
    with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) of wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, rows, pos, part = Path(run_file).read_bytes(), [], 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        part += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = pb.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == 0:
            break
    return rows


def test_report_to_wandb_offline_matches_metrics_jsonl(image_dir, tmp_path, monkeypatch, tiny_flags):
    pytest.importorskip("wandb", reason="--report_to wandb is optional; requirements.txt installs it")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path),
            "--reward",
            "recon",
            "--layers",
            "2",
            "--max_train_steps",
            "2",
            "--sample_every",
            "1",
            *tiny_flags(),
            "--report_to",
            "wandb",
        ]
    )
    history = _wandb_history(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {row["_step"]: row for row in history}
    for r in records:
        for key in ["reward/mean", "loss/policy", "recon/l1"]:
            assert logged[r["step"]][key] == pytest.approx(r[key], rel=1e-9), key
        assert logged[r["step"]]["samples/group/_type"] == "image-file"


def test_one_run_per_output_dir_and_kill_leaves_no_lock(image_dir, tmp_path, tiny_flags):
    """A second run on a busy folder exits non-zero at once (before loading a model) with one line; the first logs
    exactly one row per step; a run killed with SIGKILL leaves no stale lock (the OS drops it), so the next run
    resumes. The first run is long enough never to end by itself (a fast machine once finished 40 steps before the
    second one started)."""
    out = tmp_path / "run"
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        "--images",
        str(image_dir),
        "--output_dir",
        str(out),
        "--reward",
        "recon",
        "--layers",
        "2",
        "--max_train_steps",
        "100000",
        "--sample_every",
        "0",
        "--checkpointing_steps",
        "1",
        *tiny_flags(),
    ]
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and "LoRA parameters" not in second.stdout  # stopped before loading anything
        assert "is in use by pid" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None  # it held the lock all along
        first.kill()  # SIGKILL in the middle of the run
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    done = int(runfolder.checkpoints(out)[-1].name.split("-")[1])  # the last checkpoint's step
    train.main(
        [
            *argv[2 : -len(tiny_flags()) - 2],
            "--max_train_steps",
            str(done + 1),
            *tiny_flags(),
            "--resume_from_checkpoint",
            "latest",
        ]
    )  # in this process: the killed one's lock is gone
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, done + 2))
    state = torch.load(out / f"checkpoint-{done + 1}" / "training_state.pt", weights_only=True)
    assert state["step"] == done + 1 and "rng" not in state
