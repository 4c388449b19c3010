"""A loopback OpenAI-compatible judge server: a real HTTP server on 127.0.0.1 that answers as a VLM server would.

GET /v1/models lists the served names; POST /v1/chat/completions is answered by answer(body) -> (status, payload).
The tests drive the HTTP judge against it (good, garbage, failing and slow answers; logprobs as vLLM returns them),
and bench's --overlap uses it as a judge in a process of its own. Answers are built with `completion` (a chat
completion whose logprobs, if asked, split the text into one-character tokens) or `vllm_completion` (scores written
as vLLM writes them, each digit token with its top_logprobs).

    with serve(lambda body: (200, completion('{"A": 7}'))) as (server, url):
        ...  # train.py --judge_url URL --judge_model judge-test
"""

import base64
import io
import json
import math
import re
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

MODEL = "judge-test"  # the name the server lists and serves


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(self.server.models_status, {"object": "list", "data": [{"id": self.server.model}]})
        self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.posts.append(body)
            self.server.auth.append(self.headers.get("Authorization"))
        status, payload = self.server.answer(body)
        with self.server.lock:
            self.server.answers.append(payload)
        self._send(status, payload)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (a timeout test) is no news
            super().handle_error(request, client_address)


def make_server(answer, port=0, models_status=200, model=MODEL):
    """The server, bound to 127.0.0.1:port (0: a free one), not yet serving, listing `model`. It keeps every request
    body in .posts, its Authorization header in .auth and every answer sent in .answers."""
    srv = _Server(("127.0.0.1", port), _Handler)
    srv.daemon_threads, srv.block_on_close = True, False
    srv.answer, srv.models_status, srv.model, srv.lock = answer, models_status, model, threading.Lock()
    srv.posts, srv.auth, srv.answers = [], [], []
    return srv


@contextmanager
def serve(answer, models_status=200, model=MODEL):
    """Serve in a thread on a free port; yields (server, base URL ending in /v1)."""
    srv = make_server(answer, models_status=models_status, model=model)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def serve_forever(port, answer):
    """Serve on 127.0.0.1:port until the process ends: the target of a server process of its own."""
    make_server(answer, port).serve_forever()


# ----------------------------------------------------------------------------- what a request asks, what it gets
def keys_asked(body):
    """The JSON fields the prompt's answer format asks for: the criteria (stage 1) or the grid letters (stage 2)."""
    text = body["messages"][0]["content"][1]["text"]
    return re.findall(r'"(\w+)": <1-9>', text)


def image_sent(body):
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def completion(text, tops=None):
    """A chat completion whose logprobs split the text into one-character tokens; tops maps a character index to its
    top_logprobs [(token, probability)]; tops None: no logprobs at all (as `transformers serve` answers)."""
    content = [
        {
            "token": ch,
            "logprob": 0.0,
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in (tops or {}).get(i, [])],
        }
        for i, ch in enumerate(text)
    ]
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content} if tops is not None else None,
            }
        ]
    }


def _token(text, logprob):
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def vllm_completion(scores, distributions, model=MODEL):
    """A completion as vLLM writes one for `"logprobs": true, "top_logprobs": k`: the answer {"key": d, ...} in
    Qwen-tokenizer pieces ('{"', 'key', '":', ' ', 'd', ',', ...), every token with its logprob, bytes and
    top_logprobs; a score digit's top_logprobs are distributions[key] ({token: probability}, tokens such as "7" or
    " 7"), the written digit its most probable one. scores: {key: digit written}."""
    content = [_token('{"', 0.0)]
    for i, (key, digit) in enumerate(scores.items()):
        top = sorted(distributions[key].items(), key=lambda kv: -kv[1])
        content += [_token(key, 0.0), _token('":', 0.0), _token(" ", 0.0)]
        content.append(
            {
                **_token(str(digit), math.log(distributions[key].get(str(digit), top[0][1]))),
                "top_logprobs": [_token(t, math.log(p)) for t, p in top],
            }
        )
        content += [_token(",", 0.0), _token(' "', 0.0)] if i + 1 < len(scores) else [_token("}", 0.0)]
    for token in content:
        token.setdefault("top_logprobs", [_token(token["token"], token["logprob"])])
    text = "".join(t["token"] for t in content)
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": None},
                "logprobs": {"content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(content), "total_tokens": len(content)},
    }
