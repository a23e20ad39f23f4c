"""``goldstick serve`` over real HTTP: the server runs in a subprocess on a free loopback port (always killed at
the end); requests go through urllib (and the actual ``curl`` binary when installed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn")

from goldstick.testing.make_model import default_model_path  # noqa: E402

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024  # small, so the oversize test sends little
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, port: int, proc: subprocess.Popen, log_path):
        self.model, self.port, self.proc, self.log_path = model, port, proc, log_path
        self.base = f"http://{HOST}:{port}"

    def request(self, path: str, body: bytes | dict | None = None, method: str | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = str(default_model_path())
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "goldstick.cli", "serve", model, "--host", HOST, "--port",
                                 str(port), "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    srv = Server(model, port, proc, log_path)
    try:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log()}")
            try:
                if srv.request("/health", timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"server not healthy after {STARTUP_SECONDS}s:\n{srv.log()}")
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


CURL_BODY = ('{"model": "MODEL_PATH", "prompt": "I love Beijing, because", "max_tokens": 32, "temperature": 0, '
             '"top_p": 1.0, "top_k": 1, "repetition_penalty": 1.0}')


def check_completion(body: dict, model: str, n: int = 1) -> None:
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert isinstance(body["created"], int) and body["model"] == model
    assert len(body["choices"]) == n
    for i, choice in enumerate(body["choices"]):
        assert set(choice) == {"text", "index", "finish_reason", "logprobs"}
        assert choice["index"] == i and choice["logprobs"] is None and isinstance(choice["text"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_the_curl_request(server):
    body = CURL_BODY.replace("MODEL_PATH", server.model).encode()
    status, result = server.request("/v1/completions", body)
    assert status == 200, result
    check_completion(result, server.model)
    assert result["usage"]["completion_tokens"] <= 32
    if result["choices"][0]["finish_reason"] == "length":
        assert result["usage"]["completion_tokens"] == 32
    curl = shutil.which("curl")
    if curl:
        out = subprocess.run([curl, "-s", f"{server.base}/v1/completions", "-H", "Content-Type: application/json",
                              "-d", body.decode()], capture_output=True, timeout=60, check=True).stdout
        via_curl = json.loads(out)
        check_completion(via_curl, server.model)
        assert via_curl["choices"] == result["choices"] and via_curl["usage"] == result["usage"]


def test_models_and_health(server):
    assert server.request("/health") == (200, {"status": "ok"})
    status, models = server.request("/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.model] and models["data"][0]["object"] == "model"
    # the folder's name also selects the model; an omitted model means the served one
    name = server.model.rstrip("/").rsplit("/", 1)[-1]
    for extra in ({"model": name}, {}):
        status, result = server.request("/v1/completions", {"prompt": "我爱", "max_tokens": 2, **extra})
        assert status == 200, result


BAD_REQUESTS = {
    "malformed-json": (b'{"prompt": "x", "max_tokens": ', 400),
    "not-an-object": (b'["x"]', 400),
    "empty-body": (b"", 400),
    "missing-prompt": ({"max_tokens": 2}, 400),
    "prompt-wrong-type": ({"prompt": 5}, 400),
    "max-tokens-string": ({"prompt": "x", "max_tokens": "5"}, 400),
    "max-tokens-negative": ({"prompt": "x", "max_tokens": -1}, 400),
    "max-tokens-float": ({"prompt": "x", "max_tokens": 2.5}, 400),
    "temperature-bool": ({"prompt": "x", "temperature": True}, 400),
    "temperature-too-high": ({"prompt": "x", "temperature": 7.0}, 400),
    "nan": (b'{"prompt": "x", "top_p": NaN}', 400),
    "top-p-zero": ({"prompt": "x", "top_p": 0.0}, 400),
    "top-k-wrong-type": ({"prompt": "x", "top_k": "all"}, 400),
    "n-2": ({"prompt": "x", "n": 2}, 400),
    "stream": ({"prompt": "x", "stream": True}, 400),
    "too-long-for-context": ({"prompt": "x", "max_tokens": 5000}, 400),
    "oversize-prompt": ({"prompt": "北京 " * 2000, "max_tokens": 1}, 400),
    "oversize-body": ({"prompt": "a" * (MAX_BODY + 10)}, 413),
    "wrong-model": ({"model": "deepseek-ai/DeepSeek-R1", "prompt": "x"}, 404),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_json_errors(server, case):
    body, expected = BAD_REQUESTS[case]
    status, result = server.request("/v1/completions", body, method="POST")
    assert status == expected, result
    assert isinstance(result["error"]["message"], str) and result["error"]["message"]


def test_other_errors_and_the_server_survives(server):
    assert server.request("/nowhere")[0] == 404
    assert server.request("/v1/completions", method="GET")[0] == 405
    assert server.request("/health") == (200, {"status": "ok"})
    assert server.proc.poll() is None


def test_concurrent_requests_match_single_requests(server):
    prompts = ["I love Beijing, because", "我爱北京", "The weather today is", "北京是"]
    bodies = [{"model": server.model, "prompt": p, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
              for p in prompts]
    bodies.append({"prompt": prompts[0], "max_tokens": 4, "temperature": 0.9, "top_k": 50, "seed": 11,
                   "ignore_eos": True})
    single = [server.request("/v1/completions", b) for b in bodies]
    assert all(status == 200 for status, _ in single)
    assert len({want["choices"][0]["text"] for _, want in single}) > 1  # the prompts give different outputs
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda b: server.request("/v1/completions", b), bodies))
    for (status, got), (_, want) in zip(concurrent, single):
        assert status == 200
        check_completion(got, server.model)
        assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    assert len({got["id"] for _, got in concurrent}) == len(concurrent)


def test_prompt_list_is_one_choice_per_prompt(server):
    status, result = server.request("/v1/completions", {"prompt": ["我爱", "I love"], "max_tokens": 3,
                                                        "temperature": 0, "stop": ["\n"]})
    assert status == 200, result
    check_completion(result, server.model, n=2)
