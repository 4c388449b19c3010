"""The HTTP judge against a real OpenAI-compatible server: `transformers serve` (FastAPI + uvicorn) on the tiny
Qwen2.5-VL judge, on 127.0.0.1, driven by train.py's --judge_url and --judge_model as a user would.

Needs torchvision (the server loads the judge with AutoProcessor, and a Qwen2.5-VL processor builds its video
processor with it) and transformers' serving extra (fastapi, uvicorn, openai, pydantic: in requirements.txt);
skipped with the reason where either is missing. The random judge answers the judge's JSON because its saved
generation config biases it onto the answer's skeleton (skeleton_bias), leaving the digits to the model. What
the server did, and where this ran, is in docs/reward.md.

    python -m pytest -q tests/test_serve.py -rs
"""

import base64
import importlib.util
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

import reward
import train
from support import judges, tiny


def _missing():
    """Why the test cannot run here, in one line, or None."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (transformers serve builds Qwen2.5-VL's video processor with it)"
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # e.g. a CUDA build beside a CPU torch: "operator torchvision::nms does not exist"
        return f"torchvision does not import ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        return "transformers serve's packages are missing: pip install fastapi uvicorn openai (requirements.txt)"
    return None


MISSING = _missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
G = 4  # group size of the run: the grid asks for the letters A-D
SLOT = -1  # a score digit in an answer skeleton: any of 1..9, the model's own choice


def skeleton_bias(tokenizer, prompts, bias=100.0):
    """generation_config.sequence_bias under which any model, this random one included, answers each of `prompts`
    [(text, keys)] with the JSON skeleton {"k1": d, ...} and stops, choosing each digit d among 1..9 by its own
    logits: what the local judge forces with prefix_allowed_tokens_fn, stored where a server applies it. Every
    token of each answer is conditioned on the shortest tail of its context (chat template and answer so far,
    digits as wildcards) that no step wanting another token shares, so no two biases ever compete."""
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 10)]
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    steps = []  # (context ids, SLOTs included; the token wanted next, or SLOT)
    for text, keys in prompts:
        context = enc(text + "<|im_end|>\n<|im_start|>assistant\n")  # judges.CHATML's end of a user turn
        pieces = [f'{{"{keys[0]}": '] + [f', "{k}": ' for k in keys[1:]] + ["}"]
        answer = [t for i, p in enumerate(pieces) for t in enc(p) + [SLOT] * (i < len(keys))]
        answer.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # the eos_token_id: generate stops
        steps += [(context + answer[:i], answer[i]) for i in range(len(answer))]

    def fits(tail, context):  # could the processor's suffix match of `tail` fire on `context`?
        return len(context) >= len(tail) and all(
            a == b or (a == SLOT or a in digits) and (b == SLOT or b in digits) and SLOT in (a, b)
            for a, b in zip(tail, context[-len(tail) :])
        )

    entries = {}
    for context, want in steps:
        tail = next(
            context[-w:]
            for w in range(1, len(context) + 1)
            if not any(other != want and fits(context[-w:], c) for c, other in steps)
        )
        for filled in itertools.product(*[digits if t == SLOT else [t] for t in tail]):
            for t in digits if want == SLOT else [want]:
                entries[(*filled, t)] = bias
    return [[list(k), v] for k, v in entries.items()]


def save_served_judge(folder):
    """The tiny judge as a folder `transformers serve` loads: weights, an AutoProcessor (tokenizer, image and video
    processors, judges.CHATML as chat template) and a generation config holding the answer skeleton of the
    stage-1 and stage-2 prompts that train.py sends at --layers 2 --group_size 4."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    model, tok, image_processor = tiny.tiny_judge(seed=0)
    P, keys, labels = reward.load_prompts(), list(reward.load_prompts().criteria), list(reward.LETTERS[:G])
    prompts = [
        (reward._fill(P.stage1, P, keys, num_layers=2), keys),
        (reward._fill(P.stage2, P, labels, num_candidates=G, num_layers=2, labels=", ".join(labels)), labels),
    ]
    model.generation_config.sequence_bias = skeleton_bias(tok, prompts)
    model.save_pretrained(folder)
    Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=judges.CHATML,
    ).save_pretrained(folder)
    return prompts


def get(url, timeout=2.0):
    """(status, JSON body or error text) of a GET, HTTP errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`transformers serve FOLDER` on a free port, with no hub cache folder yet; yields (url, folder, hub cache
    folder, log path, prompts) once GET /v1/models answers, and ends the process (its own) whatever the tests did."""
    root = tmp_path_factory.mktemp("serve")
    folder, hub, log_path = root / "judge", root / "hf" / "hub", root / "serve.log"
    prompts = save_served_judge(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(folder),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                get(url + "/models")  # any HTTP answer: listening (a first 500 is the missing hub cache)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"transformers serve did not answer (exit {proc.poll()}): {log_path.read_text()[-2000:]}"
                    )
                time.sleep(0.5)
        print(f"transformers serve answered after {time.perf_counter() - t0:.1f} s")
        yield url, str(folder), hub, log_path, prompts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_startup_check_accepts_the_served_name_and_refuses_others(server, load_judge):
    """GET /v1/models on transformers serve lists its hub cache, not the model it serves: HTTP 500 while the cache
    folder is missing, then another model once one is cached. Either way the served name is accepted, and a wrong
    one, or the one name listed, is refused with one line carrying the server's reason."""
    url, folder, hub, _, _ = server
    assert get(url + "/models")[0] == 500  # "Cache directory not found"
    assert load_judge("http", model=folder, url=url).name == f"{folder} @ {url}"
    for kw, refusal in (
        (
            {"model": "wrong"},
            rf"--judge_url {url} --judge_model wrong: no judge answers there "
            r"\(GET /models answered HTTP 500; .*HTTP 400: Server is pinned to",
        ),
        ({}, r"--judge_model is required: .*\(GET /models answered HTTP 500\)"),
    ):
        with pytest.raises(ValueError, match=refusal) as e:
            load_judge("http", url=url, **kw)
        assert "\n" not in str(e.value)
    # past the check (probe=False), a refused request is not retried, and the server's reason is the last error
    unchecked = load_judge("http", model="wrong", url=url, probe=False, backoff=0.01)
    scores, stats = unchecked.score([judges.Query(Image.new("RGB", (32, 32)), "Score it.", ["a"])])
    assert scores == [None] and stats["requests"] == 1 and "HTTP 400" in stats["last_error"]
    assert "pinned" in stats["last_error"]

    snapshot = hub / "models--tiny--other-judge" / "snapshots" / ("0" * 40)  # a hub cache entry, as downloads make
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((Path(folder) / "config.json").read_text())
    (hub / "models--tiny--other-judge" / "refs").mkdir()
    (hub / "models--tiny--other-judge" / "refs" / "main").write_text("0" * 40)
    status, listing = get(url + "/models", timeout=30)
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny/other-judge"]
    assert load_judge("http", model=folder, url=url).name == f"{folder} @ {url}"
    for kw, refusal in (
        ({"model": "wrong"}, r"--judge_model wrong: not served at .*tiny/other-judge.*pinned"),
        ({}, r"--judge_model is required: .* lists only tiny/other-judge but refuses it .*pinned"),
    ):
        with pytest.raises(ValueError, match=refusal) as e:
            load_judge("http", url=url, **kw)
        assert "\n" not in str(e.value)


def test_train_one_step_against_the_server(server, design_images, tmp_path, capsys):
    """train.py with --judge_url and --judge_model: every request of the step answered at the first try (4 panels
    and 1 grid); a name the server does not serve stops train.py at start-up with one line and exit code 2."""
    url, folder, _, log_path, _ = server
    flags = [
        "--images",
        str(design_images),
        "--judge_url",
        url,
        "--pretrained_model_name_or_path",
        "tiny",
        "--resolution",
        "64",
        "--layers",
        "2",
        "--group_size",
        str(G),
        "--num_inference_steps",
        "4",
        "--rank",
        "4",
        "--lora_alpha",
        "8",
        "--mixed_precision",
        "no",
        "--train_batch_size",
        "4",
        "--images_per_step",
        "1",
        "--max_train_steps",
        "1",
        "--sample_every",
        "0",
        "--report_to",
        "none",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit) as e:
        train.main([*flags, "--output_dir", str(tmp_path / "wrong"), "--judge_model", "wrong"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --judge_") and "pinned" in err[0]
    assert "--judge_model wrong" in err[0]

    t0 = time.perf_counter()
    train.main([*flags, "--output_dir", str(tmp_path / "run"), "--judge_model", folder])
    print(f"train.py, one step against transformers serve: {time.perf_counter() - t0:.1f} s")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["judge/answered"] == record["judge/requests"] == G + 1, (record, log_path.read_text()[-2000:])
    assert record["judge/retries"] == 0 and record["judge/fallbacks"] == 0
    assert 1 <= record["stage1/total"] <= 9 and 1 <= record["stage2/score"] <= 9
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


def test_expected_scores_read_the_servers_logprobs_when_it_returns_them(server, load_judge):
    """The client asks for logprobs/top_logprobs. If the server returns them, each score is the expectation over
    the top digits at the token that wrote it; if not (transformers serve 5.23 drops both fields with a warning),
    each score is the integer the answer wrote. Checked against the same requests sent by hand."""
    url, folder, _, log_path, prompts = server
    judge = load_judge("http", model=folder, url=url, panel_size=128)
    _, tok, image_processor = tiny.tiny_judge()
    text, keys = prompts[0]
    queries = [judges.Query(Image.new("RGB", (96, 48), colour), text, keys) for colour in ("orange", "navy")]
    scores, stats = judge.score(queries)
    assert stats["requests"] == len(queries) and None not in scores
    for q, got in zip(queries, scores):
        buf = io.BytesIO()
        q.image.save(buf, format="PNG", compress_level=1)
        body = {
            "model": folder,
            "temperature": 0,
            "max_tokens": 512,
            "logprobs": True,
            "top_logprobs": 10,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
                        },
                        {"type": "text", "text": q.prompt},
                    ],
                }
            ],
        }
        answer = judges._request(url + "/chat/completions", "OPENAI_API_KEY", 60, body)
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q.prompt}]}]
        rendered = tok.apply_chat_template(
            chat, chat_template=judges.CHATML, tokenize=False, add_generation_prompt=True
        )
        image_tokens = int(image_processor(images=[q.image])["image_grid_thw"].prod()) // image_processor.merge_size**2
        # the data URL's image reached the model at its own size: one <|image_pad|> per merged 28 x 28 patch
        assert answer["usage"]["prompt_tokens"] == len(tok.encode(rendered)) - 1 + image_tokens
        choice = answer["choices"][0]
        written = judges.parse_scores(choice["message"]["content"], keys)
        assert written is not None and all(v == int(v) for v in written.values()), choice["message"]["content"]
        tokens = (choice.get("logprobs") or {}).get("content")
        if tokens:  # the expected-score path
            assert got == pytest.approx(judges._refine_with_logprobs(written, tokens, keys))
        else:  # the parsed integers, and the server said why
            assert got == written
            assert "Ignoring unsupported fields in the request" in log_path.read_text()
            assert "logprobs" in log_path.read_text()
