"""VLM judge backends for reward.py: a transformers model on this machine, an OpenAI-compatible server, the
diffusion pipeline's own Qwen2.5-VL text encoder, or the tiny offline judge; and how their answers are read.

Every backend answers a list of Query (an image, a prompt, the JSON keys asked for) with one {key: score} per
query (None when the answer could not be read), scores on the scale LOW..HIGH = 1..9. Local backends force
the answer's JSON skeleton and read the expected score from the digit logits; HTTP backends use top_logprobs
when the server returns them, else the parsed integer. The reward itself (which queries, how scores combine)
is in reward.py; nothing here knows about layers.

    python -c "from support import judges; print(judges.parse_scores('{\"alpha\": 7}', ['alpha']))"
"""

import base64
import importlib.util
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from support import quantize, tiny

with quantize.quiet_imports():
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

log = logging.getLogger("reward")
LOW, HIGH = 1, 9  # the score scale: one digit token each in Qwen tokenizers


# ------------------------------------------------------------------------------- parsing, expected scores
def _key_pattern(key):
    flags = re.IGNORECASE if len(key) > 1 else 0  # single letters (grid labels) must match case
    return re.compile(r"(?<![A-Za-z0-9_])[\"']?" + re.escape(key) + r"[\"']?\s*[:=]\s*[\"']?(-?\d+(?:\.\d+)?)", flags)


def parse_scores(text, keys, low=LOW, high=HIGH):
    """Lenient parse of a judge answer: the first JSON object in the text (nested dicts searched, keys
    case-insensitive), else `key: 7` / `"key" = 7` patterns. Returns {key: float} or None when any key is
    missing, not a number or outside [low, high] (refusals and prose give None)."""
    if not isinstance(text, str) or not text.strip():
        return None
    flat, decoder = {}, json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            stack = [decoder.raw_decode(text, m.start())[0]]  # JSON opening with "{" is an object: a dict
        except ValueError:
            continue
        while stack:  # breadth-first: top-level keys win over nested ones
            for k, v in stack.pop(0).items():
                (stack.append(v) if isinstance(v, dict) else flat.setdefault(str(k).lower(), v))
        break
    scores = {}
    for key in keys:
        v = flat.get(key.lower())  # a JSON number or numeric string; true/false are not scores
        v = (
            float(v)
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                or isinstance(v, str)
                and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", v)
            )
            else None
        )
        if v is None and (m := _key_pattern(key).search(text)):
            v = float(m.group(1))
        if v is None or not low <= v <= high:
            return None
        scores[key] = v
    return scores


def expected_score(logits: torch.Tensor, digit_ids) -> torch.Tensor:
    """E[s] = sum_{d=1..9} p(d) * d with p = softmax(logits[..., digit_ids]), i.e. the model's distribution
    renormalised over the digit tokens 1..9 (digit_ids[j] is the token of digit j+1). (..., V) -> (...)."""
    p = torch.softmax(logits[..., list(digit_ids)].float(), dim=-1)
    return (p * torch.arange(LOW, LOW + len(digit_ids), dtype=torch.float32, device=p.device)).sum(-1)


def expected_from_top_logprobs(top) -> float | None:
    """Same expectation from an OpenAI `top_logprobs` list [{token, logprob}]: the mass of the entries
    that are one digit 1..9 (spaces stripped; " 7" and "7" add up), renormalised. None if no digit."""
    mass = {}
    for t in top or []:
        tok = str(t.get("token", "")).strip()
        if (
            len(tok) == 1
            and tok in "0123456789"
            and LOW <= int(tok) <= HIGH
            and isinstance(t.get("logprob"), (int, float))
        ):
            mass[int(tok)] = mass.get(int(tok), 0.0) + math.exp(t["logprob"])
    total = sum(mass.values())
    return sum(d * m for d, m in mass.items()) / total if total > 0 else None


def _refine_with_logprobs(scores, content, keys):
    """Replace each parsed integer by the top-logprob expectation at the token that wrote it, if found."""
    if not content:
        return scores
    toks = [str(c.get("token", "")) for c in content]
    text, starts = "".join(toks), np.cumsum([0] + [len(t) for t in toks])
    out = dict(scores)
    for key in keys:
        m = _key_pattern(key).search(text)
        if not m or len(m.group(1)) != 1:
            continue
        j = int(np.searchsorted(starts, m.start(1), side="right") - 1)
        e = expected_from_top_logprobs(content[j].get("top_logprobs")) if toks[j].strip() == m.group(1) else None
        if e is not None and round(scores[key]) == int(m.group(1)):
            out[key] = e
    return out


# ------------------------------------------------------------------------------------------------ judges
@dataclass
class Query:
    image: Image.Image  # what the judge sees
    prompt: str
    keys: list  # the JSON fields the answer must hold (criteria, or grid letters)


@dataclass
class Judge:
    kind: str  # tiny | local | text_encoder | http
    name: str  # model id or URL, for logs (never the API key)
    score: Callable  # list[Query] -> (list[dict[key, float] | None], {"requests", "retries", "last_error"})
    prompts: object  # reward.Prompts: the templates and criteria the reward asks with
    panel_size: int = 1024  # longest side (px) of a stage-1 panel as sent to the judge
    grid_size: int = 1024  # longest side (px) of a stage-2 grid as sent to the judge
    weight_bytes: int = 0  # its weights' bytes on the training GPU while it scores (local judges), for memory.py


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_PAD = "<|image_pad|>"


def _local_scorer(model, tokenizer, image_processor, batch_size=16, offload_to=None):
    """Score queries with a transformers Qwen-VL model: one generate per batch of same-key queries, the assistant turn
    forced to the JSON skeleton {"k1": d, "k2": d, ...} (each d greedy among digits 1..9) so every score
    position is known; the score is the expected value over the digit logits there. With offload_to (e.g.
    "cpu"), the weights live there and visit the model's device only while a score() call runs, so a judge
    on the training GPU costs its memory only while it scores, for two weight copies per call (docs/training.md)."""
    digit_ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(LOW, HIGH + 1)]
    for d, ids in enumerate(digit_ids, LOW):
        if len(ids) != 1:
            raise ValueError(f"judge tokenizer splits '{d}' into {len(ids)} tokens; use --judge http for this model")
    digit_ids = [ids[0] for ids in digit_ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    def encode(prompts, images):  # enable_thinking=False: Qwen3-style templates then open the answer directly
        """The inputs a Qwen-VL processor would build, from the tokenizer and the PIL image processor alone: the
        same path whether or not torchvision is installed (a Qwen-VL AutoProcessor needs it for its video part)."""
        kw = {"add_generation_prompt": True, "tokenize": False, "enable_thinking": False}
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
        texts = []
        for c in chats:  # the model's own template if it places one image, else plain ChatML (all Qwen-VL speak it)
            try:
                text = tokenizer.apply_chat_template(c, **kw)
            except Exception:
                text = ""
            ok = isinstance(text, str) and text.count(IMAGE_PAD) == 1
            texts.append(text if ok else tokenizer.apply_chat_template(c, chat_template=CHATML, **kw))
        px = image_processor(
            images=images, return_tensors="pt"
        )  # pixel_values (sum patches, D), image_grid_thw (n, 3)
        n_tokens = (px["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
        texts = [t.replace(IMAGE_PAD, IMAGE_PAD * k, 1) for t, k in zip(texts, n_tokens)]
        enc = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
        enc["mm_token_type_ids"] = (enc["input_ids"] == tokenizer.convert_tokens_to_ids(IMAGE_PAD)).int()
        enc.update(px)
        return enc.to(device)

    def skeleton(keys):  # allowed tokens per generated step, and the steps that hold a score digit
        plan, score_steps, pieces = [], [], [f'{{"{keys[0]}": '] + [f', "{k}": ' for k in keys[1:]] + ["}"]
        for i, piece in enumerate(pieces):
            plan += [[t] for t in tokenizer.encode(piece, add_special_tokens=False)]
            if i < len(keys):
                score_steps.append(len(plan))
                plan.append(digit_ids)
        return plan, score_steps

    @torch.no_grad()
    def score(queries):
        results, stats, by_keys = [None] * len(queries), {"requests": 0, "retries": 0, "last_error": None}, {}
        for i, q in enumerate(queries):
            by_keys.setdefault(tuple(q.keys), []).append(i)
        for keys, idx in by_keys.items():
            plan, score_steps = skeleton(list(keys))
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                stats["requests"] += 1
                try:
                    enc = encode([queries[i].prompt for i in chunk], [queries[i].image for i in chunk])
                    L = enc["input_ids"].shape[1]
                    out = model.generate(
                        **enc,
                        max_new_tokens=len(plan),
                        do_sample=False,
                        pad_token_id=pad_id,
                        prefix_allowed_tokens_fn=lambda b, ids: plan[min(len(ids) - L, len(plan) - 1)],
                        output_logits=True,
                        return_dict_in_generate=True,
                    )
                except (RuntimeError, ValueError) as e:  # e.g. out of memory: count as failed answers, go on
                    stats["last_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    log.warning("judge batch of %d failed: %s", len(chunk), stats["last_error"])
                    continue
                texts = tokenizer.batch_decode(out.sequences[:, L:], skip_special_tokens=True)
                expected = expected_score(torch.stack([out.logits[s] for s in score_steps], 1), digit_ids)  # (b, K)
                for row, i in enumerate(chunk):  # the forced answer must parse: this checks the skeleton
                    if parse_scores(texts[row], keys) is not None and torch.isfinite(expected[row]).all():
                        results[i] = dict(zip(keys, expected[row].tolist()))
                    else:
                        stats["last_error"] = f"forced answer did not parse: {texts[row][:80]!r}"
        return results, stats

    if offload_to is None:
        return score

    def offloaded(queries):
        model.to(device)
        try:
            return score(queries)
        finally:
            model.to(offload_to)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    model.to(offload_to)
    return offloaded


def _http_scorer(
    url, model, api_key_env, timeout, max_retries, backoff, concurrency, max_tokens, logprobs, extra_body
):
    """Score queries against POST {url}/chat/completions, one request per query, `concurrency` at a time;
    a query is tried up to 1 + max_retries times, sleeping backoff * 2^(r-1) seconds before retry r. The bound
    holds across concurrent score() calls (train.py judges several groups at once): one semaphore per judge."""
    use_logprobs = bool(logprobs)  # turned off for good if the server rejects the field (HTTP 400)
    in_flight = threading.BoundedSemaphore(max(1, concurrency))

    def one(q):  # -> (scores | None, attempts, last error | None)
        nonlocal use_logprobs
        buf = io.BytesIO()  # zlib level 1: the same pixels, a few more bytes, far less CPU than PIL's default 6
        q.image.save(buf, format="PNG", compress_level=1)
        content = [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
            },
            {"type": "text", "text": q.prompt},
        ]
        attempts, error = 0, None
        while attempts <= max_retries:
            if attempts:
                time.sleep(backoff * 2 ** (attempts - 1))
            attempts += 1
            body = {
                "model": model,
                "messages": [{"role": "user", "content": content}],
                "temperature": 0,
                "max_tokens": max_tokens,
                **(extra_body or {}),
            }
            if use_logprobs:
                body.update(logprobs=True, top_logprobs=10)
            try:
                choice = _request(url + "/chat/completions", api_key_env, timeout, body)["choices"][0]
                text = choice["message"].get("content")
                if isinstance(text, list):  # some servers return content parts
                    text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
                if (scores := parse_scores(text, q.keys)) is not None:
                    tokens = (choice.get("logprobs") or {}).get("content")
                    return _refine_with_logprobs(scores, tokens, q.keys), attempts, None
                error = f"unparseable answer {str(text)[:120]!r}"
                log.warning("judge answer unparseable (attempt %d): %r", attempts, str(text)[:120])
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code in (400, 422) and "logprobs" in body and "logprob" in detail.lower():  # rejects the field
                    use_logprobs = False  # (other 400s, e.g. a prompt too long, leave logprobs on for the rest)
                    log.warning(
                        "judge server rejected logprobs (HTTP %d); asking for plain answers from now on", e.code
                    )
                    attempts -= 1  # not the answer's fault: this try is free
                    continue
                error = f"HTTP {e.code} {e.reason}: {detail}"[:300]
                log.warning("judge %s (attempt %d)", error, attempts)
                if e.code in (400, 401, 403, 404, 422):
                    return None, attempts, error  # the same request gets the same answer: no retry
            except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:  # URLError is one
                error = f"{type(e).__name__}: {e}"[:200]
                log.warning("judge request failed (attempt %d): %s", attempts, error)
        return None, attempts, error

    def bounded(q):
        with in_flight:
            return one(q)

    def score(queries):
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(queries)))) as pool:
            out = list(pool.map(bounded, queries))
        attempts = sum(a for _, a, _ in out)
        errors = [e for _, _, e in out if e]
        return [s for s, _, _ in out], {
            "requests": attempts,
            "retries": attempts - len(out),
            "last_error": errors[-1] if errors else None,
        }

    return score


def _error_text(e: urllib.error.HTTPError) -> str:
    """The server's own words for an HTTP error, on one line: FastAPI's {"detail"}, OpenAI's and vLLM's
    {"error": {"message"}}, or the start of the raw body."""
    try:
        raw = e.read().decode(errors="replace")
    except (OSError, ValueError):
        return ""
    try:
        j = json.loads(raw)
        err = j.get("error", j.get("detail", raw)) if isinstance(j, dict) else raw
        text = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        text = raw
    return " ".join(str(text).split())[:200]


def _request(url, api_key_env, timeout, body=None):
    """GET (body None) or POST JSON; the key is read here, at send time, and goes only into the header."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = "Bearer " + os.environ[api_key_env]
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as r:
        return json.loads(r.read().decode())


def make_judge(kind: str, model: str | None = None, url: str | None = None, prompts=None, **options) -> Judge:
    """Build a judge and check it works now, before any expensive work.
    kind "tiny": random tiny Qwen2.5-VL (options: seed, panel_size, grid_size; default 128 px images).
    kind "local": model = hub id or folder of a Qwen-VL image-text-to-text model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
        Qwen3.5; options: device, dtype, batch_size, offload: keep the weights in CPU memory except while scoring).
    kind "text_encoder": reuse a loaded Qwen2_5_VLForConditionalGeneration, e.g. the diffusion pipeline's own
        (options: pipeline, or text_encoder and tokenizer): zero extra GPU memory.
    kind "http": url = OpenAI-compatible base URL (ending in /v1 or similar), model = served model name
        (options: api_key_env="OPENAI_API_KEY", timeout=60, max_retries=3, backoff=1.0, concurrency=16,
        max_tokens=512, logprobs=True, extra_body=None, probe=True).
    Common options: panel_size, grid_size. `prompts` (reward.Prompts) travels with the judge for the reward."""
    sizes = {k: int(v) for k in ("panel_size", "grid_size") if (v := options.pop(k, None)) is not None}
    if kind == "tiny":
        scorer = _local_scorer(
            *tiny.tiny_judge(options.get("seed", 0)),
            batch_size=options.get("batch_size", 16),
            offload_to=options.get("offload_to"),
        )

        def one_thread(queries):  # ops this small run several times faster on one CPU thread than on two
            n = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return scorer(queries)
            finally:
                torch.set_num_threads(n)

        return Judge("tiny", "tiny-qwen2.5-vl", one_thread, prompts, **{"panel_size": 128, "grid_size": 128, **sizes})
    if kind == "text_encoder":
        pipe = options.get("pipeline")
        enc = options.get("text_encoder", getattr(pipe, "text_encoder", None))
        tok = options.get("tokenizer", getattr(pipe, "tokenizer", None))
        if tok is None or not hasattr(enc, "generate") or not hasattr(enc, "lm_head"):
            raise ValueError(
                "--judge text_encoder needs the pipeline's Qwen2_5_VLForConditionalGeneration text "
                "encoder and its tokenizer (make_judge('text_encoder', pipeline=pipe))"
            )
        scorer = _local_scorer(
            enc.eval(),
            tok,
            options.get("image_processor") or Qwen2VLImageProcessorPil(),
            batch_size=options.get("batch_size", 16),
        )
        return Judge("text_encoder", type(enc).__name__, scorer, prompts, **sizes)
    if kind == "local":
        scorer, weight_bytes = _load_local(model, **options)
        return Judge("local", str(model), scorer, prompts, **sizes, weight_bytes=weight_bytes)
    if kind == "http":
        if not url:
            raise ValueError("--judge http needs --judge_url (e.g. http://localhost:8000/v1)")
        url, o = (
            url.rstrip("/"),
            {
                "api_key_env": "OPENAI_API_KEY",
                "timeout": 60.0,
                "max_retries": 3,
                "backoff": 1.0,
                "concurrency": 16,
                "max_tokens": 512,
                "logprobs": True,
                "extra_body": None,
                "probe": True,
                **options,
            },
        )
        if o.pop("probe"):
            model = _probe(url, model, o["api_key_env"], o["timeout"])
        if not model:
            raise ValueError("--judge http needs --judge_model (the model name the server serves)")
        return Judge("http", f"{model} @ {url}", _http_scorer(url, model, **o), prompts, **sizes)
    raise ValueError(f"--judge {kind!r}: choose one of tiny, local, text_encoder, http")


def _load_local(model, device=None, dtype=None, batch_size=16, offload=False):
    """A Qwen-VL judge (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) from a hub id or folder: the model, its tokenizer
    and its image processor's PIL backend. One path whatever is installed (no AutoProcessor: with torchvision it
    takes another route, without it a Qwen-VL processor does not load); other VLM families: serve them over HTTP."""

    if not model:
        raise ValueError("--judge local needs --judge_model (a hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct, or a folder)")
    if str(model).startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"--judge_model {model}: no such folder (give a local model folder or a hub id)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        image_processor = AutoImageProcessor.from_pretrained(model, backend="pil")
        if not hasattr(image_processor, "merge_size") or IMAGE_PAD not in tokenizer.get_vocab():
            raise ValueError(
                f"{type(image_processor).__name__} is not a Qwen-VL image processor; the local judge "
                "reads Qwen-VL models (serve other VLMs with vLLM or SGLang and pass --judge_url)"
            )
        vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device_map=device).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"--judge_model {model}: could not load it as a Qwen-VL image-text-to-text model "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    warn_slow_kernels(vlm.config, device)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*vlm.parameters(), *vlm.buffers()])
    return _local_scorer(vlm, tokenizer, image_processor, batch_size, "cpu" if offload else None), weight_bytes


def warn_slow_kernels(config, device):
    """Qwen3.5's linear-attention layers run on slow reference kernels unless flash-linear-attention and
    causal-conv1d are installed: say so once, in one line, when they are missing on CUDA."""

    text = getattr(config, "text_config", config)
    hybrid = "linear_attention" in (getattr(text, "layer_types", None) or []) or str(
        getattr(config, "model_type", "")
    ).startswith("qwen3_5")
    missing = [
        pkg
        for pkg, mod in (("flash-linear-attention", "fla"), ("causal-conv1d", "causal_conv1d"))
        if importlib.util.find_spec(mod) is None
    ]
    warn = hybrid and bool(missing) and str(device).startswith("cuda")
    if warn:
        log.warning(
            "judge %s: linear-attention layers will run on slow reference kernels; pip install %s",
            getattr(config, "model_type", "?"),
            " ".join(missing),
        )
    return warn


def _probe(url, model, api_key_env, timeout=60.0):
    """Check the server before any expensive work; returns the model name to use (the only one listed if None).
    GET {url}/models (10 s timeout) lists the served names on vLLM, SGLang and Gemini. Some servers list something
    else: `transformers serve` lists the models in its hub cache (HTTP 500 when there is none), not the one it
    serves, and answers HTTP 400 to a request for another. So a name the list does not hold, or one taken from
    the list for the user, is tried with one chat request of one token (`timeout`). Bad input (URL, key, name)
    stops here with one line."""
    key_hint = f"set the API key in ${api_key_env} (or --api_key_env)"

    def ask(name):  # -> (answered, HTTP status of a refusal or None, what happened)
        body = {
            "model": name,
            "messages": [{"role": "user", "content": "Answer with one digit."}],
            "max_tokens": 1,
            "temperature": 0,
        }
        try:
            return (
                "choices" in _request(url + "/chat/completions", api_key_env, timeout, body),
                None,
                "a one-token chat request got no choices back",
            )
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise ValueError(
                    f"--judge_url {url}: POST /chat/completions answered HTTP {e.code}; {key_hint}"
                ) from None
            return False, e.code, f"a one-token chat request answered HTTP {e.code}: {_error_text(e)}"
        except (OSError, ValueError, AttributeError) as e:
            return False, None, f"a one-token chat request failed ({type(e).__name__}: {getattr(e, 'reason', e)})"

    try:
        served = [m.get("id") for m in _request(url + "/models", api_key_env, 10.0).get("data", [])]
        listed = f"it lists {len(served)}: {served[:8]}"
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ValueError(f"--judge_url {url}: GET /models answered HTTP {e.code}; {key_hint}") from None
        served, listed = None, f"GET /models answered HTTP {e.code}"
    except (OSError, ValueError, AttributeError) as e:  # URLError and timeouts are OSErrors
        raise ValueError(
            f"--judge_url {url}: cannot reach the judge server ({type(e).__name__}: "
            f"{getattr(e, 'reason', e)}); start it or fix the URL"
        ) from None
    if not model:
        if served is None or len(served) != 1:
            raise ValueError(f"--judge_model is required: the model name {url} serves ({listed})")
        _, refused, why = ask(served[0])  # only a refusal counts against the guess: a busy server may time out
        if refused is not None and 400 <= refused < 500:
            raise ValueError(f"--judge_model is required: {url} lists only {served[0]} but refuses it ({why})")
        return served[0]
    if served is not None and (model in served or f"models/{model}" in served):
        return model
    answered, _, why = ask(model)
    if not answered:  # with no list to go by, the URL may be the wrong one as well
        head = (
            f"--judge_model {model}: not served at {url}"
            if served is not None
            else f"--judge_url {url} --judge_model {model}: no judge answers there"
        )
        raise ValueError(f"{head} ({listed}; {why}); fix the URL or the model name")
    log.info("judge %s: not listed by GET %s/models (%s), but it answers", model, url, listed)
    return model
