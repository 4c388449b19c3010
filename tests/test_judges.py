"""The judges (support/judges.py): an OpenAI-compatible server on 127.0.0.1, the tiny and local Qwen-VL judges,
expected scores and the lenient parser."""

import json
import math
import socket
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import reward
from support import judges, tiny
from support.openai_server import completion, keys_asked

KEYS = list(reward.load_prompts().criteria)


@contextmanager
def one_thread():
    """Models this small run several times faster on one CPU thread (as the tiny judge does itself)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _layers(g, n=3, h=24, w=32, seed=0):
    torch.manual_seed(seed)
    return torch.rand(g, n, 4, h, w)


def test_http_good_answers_use_top_logprobs_weights_and_key(monkeypatch, caplog, judge_server, http_judge):
    stage1 = {"separation": 9, "alpha": 7, "inpainting": 5, "distribution": 3, "validity": 1}

    def answer(body):
        keys = keys_asked(body)
        if keys == KEYS:  # only the alpha digit carries top logprobs: 7 and 6 at p = 0.5 each -> 6.5
            text = json.dumps(stage1)
            return 200, completion(text, {text.index('"alpha": ') + 9: [("7", 0.5), (" 6", 0.5), ("x", 0.9)]})
        text = json.dumps({k: 9 - i for i, k in enumerate(keys)})  # A=9, B=8, ... each with E = digit - 0.25
        return 200, completion(
            text, {text.index(f'"{k}": ') + 5: [(str(9 - i), 0.75), (str(8 - i), 0.25)] for i, k in enumerate(keys)}
        )

    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-test-secret-123")
    with judge_server(answer) as (srv, url):
        judge = http_judge(url, api_key_env="JUDGE_TEST_KEY")
        images = [Image.new("RGB", (32, 24), c) for c in ("red", "blue")]
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge, seed=3)
        assert info["stage1/separation"] == 9.0 and info["stage1/alpha"] == pytest.approx(6.5)
        assert info["stage1/total"] == pytest.approx((9 + 6.5 + 5 + 3 + 1) / 5)
        positions = ["ABCD".index(c["label"]) for c in info["candidates"]]
        assert rewards.tolist() == pytest.approx([9 - p - 0.25 for p in positions])
        assert info["judge/requests"] == 10 and info["judge/retries"] == 0 and info["judge/fallbacks"] == 0
        mean_r, _ = reward.vlm_reward(images, _layers(8), 4, judge=judge, seed=3, combine="mean")
        assert mean_r.tolist() == pytest.approx([(4.9 + 9 - p - 0.25) / 2 for p in positions])
        w_r, w_info = reward.vlm_reward(
            images, _layers(8), 4, judge=judge, combine="stage1", weights={"separation": 3}
        )
        assert w_r.tolist() == pytest.approx([(27 + 6.5 + 5 + 3 + 1) / 7] * 8)
        assert w_info["judge/requests"] == 8  # stage1 mode sends no grid
        assert set(srv.auth) == {"Bearer sk-test-secret-123"}
        assert all(b["temperature"] == 0 and b["logprobs"] is True for b in srv.posts)
    assert "sk-test-secret" not in repr(judge) + repr(info) + caplog.text


def test_http_garbage_falls_back_and_counts(judge_server, http_judge):
    bad = [
        (200, completion("I'm sorry, I can't rate images.")),
        (200, completion('{"separation": 5, "alpha": 5}')),  # fields missing
        (
            200,
            completion(
                '{"A": 10, "B": 0, "C": 5, "D": 5, "separation": 12, "alpha": 0, "inpainting": 5, '
                '"distribution": 5, "validity": 5}'
            ),
        ),  # out of range
        (200, {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "no"}}]}),
        (200, b"<html>not json</html>"),
        (200, {"choices": []}),
        (200, {"error": "overloaded"}),
    ]
    count = [0]

    def answer(body):
        if mode[0] == "stage2_only" and keys_asked(body) == KEYS:
            return 200, completion(json.dumps({k: 6 for k in KEYS}))
        count[0] += 1
        return bad[count[0] % len(bad)]

    mode = ["all"]
    with judge_server(answer) as (srv, url):
        judge = http_judge(url, max_retries=2)
        images = [Image.new("RGB", (32, 24), "white")] * 2
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge)
        assert rewards.tolist() == [5.0] * 8  # mid-scale for everyone: zero advantage
        assert (info["judge/failed_stage1"], info["judge/failed_stage2"], info["judge/fallbacks"]) == (8, 2, 8)
        assert len(srv.posts) == info["judge/requests"] == 10 * 3 and info["judge/retries"] == 20
        assert info["judge/answered"] == 0 and info["judge_last_error"]  # what train.py stops on, and names
        assert all(c["stage1"] is None and c["stage2"] is None and c["fallback"] for c in info["candidates"])
        mode[0] = "stage2_only"
        rewards, info = reward.vlm_reward(images, _layers(8), 4, judge=judge)
        assert rewards.tolist() == [6.0] * 8  # stage 1 stands in for the failed grids
        assert (info["judge/failed_stage1"], info["judge/failed_stage2"], info["judge/fallbacks"]) == (0, 2, 8)
        assert info["judge/answered"] == 8  # the 8 panels, not the 2 grids
        assert all(np.isfinite(v) for k, v in info.items() if k not in ("candidates", "judge_last_error"))


def test_http_500_then_success_and_logprobs_rejected(judge_server, http_judge):
    seen, lock = {}, threading.Lock()

    def answer(body):
        key = json.dumps(body["messages"], sort_keys=True)
        with lock:
            seen[key] = seen.get(key, 0) + 1
            first = seen[key] == 1
        if first:
            return 500, {"error": "try again"}
        if "logprobs" in body:
            return 400, {"error": "logprobs not supported"}
        return 200, completion(json.dumps({k: 4 for k in keys_asked(body)}))

    with judge_server(answer) as (srv, url):
        judge = http_judge(url, max_retries=3)
        t0 = time.perf_counter()
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "gray")], _layers(4), 4, judge=judge)
        assert time.perf_counter() - t0 < 5
    assert rewards.tolist() == [4.0] * 4 and info["judge/fallbacks"] == 0
    assert info["judge/retries"] == 5  # every query's 500 was retried once (the 400 retry is free)
    assert sum("logprobs" in b for b in srv.posts) >= 1 and "logprobs" not in srv.posts[-1]


def test_http_slow_server_times_out_in_bounded_time(judge_server, http_judge):
    def answer(body):
        time.sleep(5.0)
        return 200, completion(json.dumps({k: 8 for k in keys_asked(body)}))

    with judge_server(answer) as (srv, url):
        judge = http_judge(url, timeout=0.3, max_retries=1)
        t0 = time.perf_counter()
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "gray")], _layers(4), 4, judge=judge)
        elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, elapsed  # did not wait for the 5 s answers
    assert rewards.tolist() == [5.0] * 4
    assert info["judge/requests"] == 10 and info["judge/failed_stage1"] == 4 and info["judge/failed_stage2"] == 1


def test_http_judge_fails_at_startup_with_a_clear_message(load_judge, judge_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"--judge_url .*cannot reach"):
        load_judge("http", model="m", url=f"http://127.0.0.1:{dead_port}/v1")
    assert time.perf_counter() - t0 < 5
    with judge_server(lambda b: (200, {}), models_status=401) as (_, url):
        with pytest.raises(ValueError, match=r"HTTP 401.*MY_KEY"):
            load_judge("http", model="judge-test", url=url, api_key_env="MY_KEY")
    with judge_server(lambda b: (200, {})) as (_, url):
        with pytest.raises(ValueError, match=r"--judge_model nope: not served"):
            load_judge("http", model="nope", url=url)
        assert load_judge("http", url=url).name.startswith("judge-test")  # the only model served


# ------------------------------------------------------------------------------------------- tiny judge


def test_tiny_judge_end_to_end_group_of_4(tiny_judge, tmp_path):
    images = [Image.new("RGB", (32, 24), "orange"), Image.new("RGB", (40, 30), "teal")]
    layers = _layers(8)
    rewards, info = reward.vlm_reward(images, layers, 4, judge=tiny_judge, seed=7, save_dir=tmp_path)
    assert rewards.shape == (8,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    expected_keys = {f"stage1/{k}" for k in KEYS} | {
        "stage1/total",
        "stage1/group_std",
        "stage2/score",
        "stage2/group_std",
        "reward/mean",
        "judge/failed_stage1",
        "judge/failed_stage2",
        "judge/fallbacks",
        "judge/requests",
        "judge/retries",
        "time/judge_s",
        "time/reward_s",
    }
    assert expected_keys <= set(info) and all(
        isinstance(info[k], float) and math.isfinite(info[k]) for k in expected_keys
    )
    assert info["judge/requests"] == 2  # one batched generate per stage, not one call per candidate
    assert len(info["candidates"]) == 8
    for b, c in enumerate(info["candidates"]):
        assert set(c["criteria"]) == set(KEYS) and c["reward"] == pytest.approx(float(rewards[b]))
        if not c["fallback"]:
            assert c["reward"] == pytest.approx(c["stage2"])
        assert 1 <= c["stage1"] <= 9 and c["stage1"] != round(c["stage1"])  # an expectation, not a digit
    again, info2 = reward.vlm_reward(images, layers, 4, judge=tiny_judge, seed=7, combine="stage1")
    assert info2["judge/requests"] == 1
    assert again.tolist() == pytest.approx([c["stage1"] for c in info["candidates"]], abs=1e-5)
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved.count("stage2_grid_00.png") == 1 and len([s for s in saved if s.startswith("stage1_panel")]) == 8
    with Image.open(tmp_path / "stage2_grid_01.png") as grid:
        assert max(grid.size) <= tiny_judge.grid_size


def test_qwen3_5_judge_names_its_missing_fast_kernels_once(caplog):
    """The default judge's architecture (Qwen3.5: linear-attention layers) on CUDA without flash-linear-attention
    and causal-conv1d: one warning line naming what to install; nothing on CPU or for a full-attention model."""
    import importlib.util

    from transformers import Qwen2_5_VLConfig, Qwen3_5Config

    missing = [m for m in ("fla", "causal_conv1d") if importlib.util.find_spec(m) is None]
    with caplog.at_level("WARNING", logger="reward"):
        assert judges.warn_slow_kernels(Qwen3_5Config(), "cuda:0") == bool(missing)
        assert not judges.warn_slow_kernels(Qwen3_5Config(), "cpu")
        assert not judges.warn_slow_kernels(Qwen2_5_VLConfig(), "cuda:0")
    lines = [r.getMessage() for r in caplog.records]
    pip_name = {"fla": "flash-linear-attention", "causal_conv1d": "causal-conv1d"}
    assert len(lines) == bool(missing) and all(
        "pip install" in line and all(pip_name[m] in line for m in missing) for line in lines
    )


def test_judge_offload_keeps_the_scores(tiny_judge, load_judge):
    """A local judge whose weights live in CPU memory and visit its device only while scoring (train.py's
    --judge_offload) scores exactly as the resident one. On this CPU-only machine both places are the CPU, so this
    checks the path and the scores; the memory it saves is a GPU figure (docs/performance.md)."""
    offloaded = load_judge("tiny", offload_to="cpu")
    images, layers = [Image.new("RGB", (32, 24), "orange")], _layers(4)
    a, _ = reward.vlm_reward(images, layers[:4], 4, judge=tiny_judge, seed=3)
    b, _ = reward.vlm_reward(images, layers[:4], 4, judge=offloaded, seed=3)
    assert torch.equal(a, b)


def test_local_judge_loads_a_saved_folder(tiny_judge, tmp_path, load_judge):
    model, tok, ip = tiny.tiny_judge(seed=0)
    for part in (model, tok, ip):
        part.save_pretrained(tmp_path)
    local = load_judge("local", model=str(tmp_path), device="cpu", panel_size=128)
    images, layers = [Image.new("RGB", (32, 24), "orange")], _layers(2)
    with one_thread():
        r_local, _ = reward.vlm_reward(images, layers, 2, judge=local, combine="stage1")
    r_tiny, _ = reward.vlm_reward(images, layers, 2, judge=tiny_judge, combine="stage1")
    assert torch.allclose(r_local, r_tiny, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="--judge_model /no/such/judge"):
        load_judge("local", model="/no/such/judge")
    # the pipeline's text encoder as judge, with a tokenizer whose chat template knows no images (-> ChatML)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    reuse = load_judge("text_encoder", text_encoder=model, tokenizer=tok, panel_size=128)
    with one_thread():
        r_reuse, _ = reward.vlm_reward(images, layers, 2, judge=reuse, combine="stage1")
    assert torch.allclose(r_reuse, r_tiny, atol=1e-5)
    with pytest.raises(ValueError, match="text_encoder needs"):
        load_judge("text_encoder", text_encoder=model.model, tokenizer=tok)  # no lm_head: cannot answer


def test_local_judge_runs_a_hybrid_attention_qwen3_5(tmp_path, load_judge):
    """The released model's judge family (Qwen3.5: linear + full attention, 16 px patches), tiny and random."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _, tok, _ = tiny.tiny_judge()
    ids = {
        s: tok.convert_tokens_to_ids(s)
        for s in (
            "<|image_pad|>",
            "<|video_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|endoftext|>",
            "<|im_end|>",
        )
    }
    config = Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=2,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
                "partial_rotary_factor": 0.5,
            },
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=16,
            num_position_embeddings=64,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    for part in (Qwen3_5ForConditionalGeneration(config), tok, Qwen2VLImageProcessorPil(patch_size=16)):
        part.save_pretrained(tmp_path)
    judge = load_judge("local", model=str(tmp_path), device="cpu", panel_size=96, grid_size=96)
    with one_thread():
        rewards, info = reward.vlm_reward([Image.new("RGB", (32, 24), "red")], _layers(4), 4, judge=judge)
    assert info["judge/requests"] == 2 and info["judge/fallbacks"] == 0 and torch.isfinite(rewards).all()
    assert len({round(c["stage2"], 6) for c in info["candidates"]}) > 1  # read from logits, per candidate


# ---------------------------------------------------------------------------------- scores and parsing


def test_expected_score_on_crafted_logits():
    digit_ids = [10 + d for d in range(9)]  # token 10 is "1", ..., token 18 is "9"
    logits = torch.full((4, 32), -1e4)
    logits[0, 16] = 0.0  # all mass on "7"
    logits[1, digit_ids] = 0.0  # uniform over 1..9 -> 5
    logits[2, [11, 17]] = 0.0  # "2" and "8" equally likely -> 5
    logits[2, 0] = 50.0  # a huge non-digit logit is ignored (renormalised over the digits)
    logits[3, [12, 13]] = torch.tensor([0.0, math.log(3.0)])  # p(3) = 1/4, p(4) = 3/4 -> 3.75
    assert judges.expected_score(logits, digit_ids).tolist() == pytest.approx([7.0, 5.0, 5.0, 3.75])
    top = [
        {"token": " 3", "logprob": math.log(0.2)},
        {"token": "4", "logprob": math.log(0.6)},
        {"token": "x", "logprob": math.log(0.15)},
        {"token": "10", "logprob": -1.0},
    ]
    assert judges.expected_from_top_logprobs(top) == pytest.approx((3 * 0.2 + 4 * 0.6) / 0.8)
    assert judges.expected_from_top_logprobs([{"token": "yes", "logprob": 0.0}]) is None
    # unicode digits that are not ASCII ("²", "٣") are ignored, not crashed on
    top = [{"token": "²", "logprob": 0.0}, {"token": "٣", "logprob": 0.0}, {"token": " 4", "logprob": math.log(0.5)}]
    assert judges.expected_from_top_logprobs(top) == 4.0


GOOD = {k: v for k, v in zip(KEYS, [7, 3, 9, 1, 5])}


@pytest.mark.parametrize(
    "text, expected",
    [
        (json.dumps(GOOD), GOOD),
        ("```json\n" + json.dumps(GOOD) + "\n```", GOOD),
        ("Sure! Here are my scores: " + json.dumps(GOOD) + " Hope this helps.", GOOD),
        ('{"scores": {"Separation": 7, "ALPHA": "3", "inpainting": 9.0, "distribution": 1, "validity": 5}}', GOOD),
        ("{'separation': 7, 'alpha': 3, 'inpainting': 9, 'distribution': 1, 'validity': 5,}", GOOD),
        ("separation: 7\nalpha = 3\ninpainting: 9/9\ndistribution: 1\nvalidity: 5", GOOD),
        ('{"separation": 7, "alpha": 3, "inpainting": 9, "distribution": 1}', None),  # missing field
        ('{"separation": 7, "alpha": 3, "inpainting": 10, "distribution": 1, "validity": 5}', None),  # out of range
        ('{"separation": 0, "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
        ('{"separation": true, "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
        ('{"separation": "high", "alpha": 3, "inpainting": 9, "distribution": 1, "validity": 5}', None),
        ("I'm sorry, but I can't help with evaluating this image.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_scores_table(text, expected):
    got = judges.parse_scores(text, KEYS)
    assert got == (None if expected is None else {k: float(v) for k, v in expected.items()})


def test_parse_grid_labels_are_case_sensitive():
    assert judges.parse_scores("Candidate A: 8, B: 2, C: 5", ["A", "B", "C"]) == {"A": 8.0, "B": 2.0, "C": 5.0}
    assert judges.parse_scores("data: 8, b: 2, c: 5", ["A", "B", "C"]) is None
