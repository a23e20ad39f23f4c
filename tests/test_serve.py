"""``goldstick serve`` over real HTTP: the server runs in a subprocess on a free loopback port (always killed at
the end); requests go through urllib (and the actual ``curl`` binary when installed). Log-probabilities are checked
against the same model loaded in the test process."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import jinja2
import numpy as np
import pytest
from mindspore import Tensor

pytest.importorskip("fastapi", reason="the server needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn")

from goldstick.quant.numerics import log_softmax  # noqa: E402
from goldstick.serve.engine import Engine  # noqa: E402
from goldstick.serve.generate import Generator, SamplingParams  # noqa: E402
from goldstick.serve.host_ops import host_primitives  # noqa: E402
from goldstick.testing.make_model import default_model_path  # noqa: E402
from goldstick.testing.serve_process import HOST, ServeProcess  # noqa: E402

PROMPTS = ["I love Beijing, because", "我爱北京", "The weather today is", "北京是"]
MAX_BODY = 64 * 1024  # small, so the oversize test sends little
STARTUP_SECONDS = 120


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


@contextmanager
def start_server(model: str, log_path):
    """A started and healthy server, stopped on leaving the context."""
    with ServeProcess(model, log_path, args=("--max-body-bytes", str(MAX_BODY)), startup=STARTUP_SECONDS) as proc:
        yield Server(model, proc.port, proc.proc, log_path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(str(default_model_path()), tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def generator():
    """The served model in the test process (eager MindSpore)."""
    return Generator.from_dir(default_model_path())


@pytest.fixture(scope="module")
def served_path():
    """The served model in the test process, computed as the server computes it (primitives on the host)."""
    gen = Generator.from_dir(default_model_path())
    host_primitives(gen.net)
    return gen


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
    "logprobs-over-20": ({"prompt": "x", "logprobs": 21}, 400),
    "logprobs-negative": ({"prompt": "x", "logprobs": -1}, 400),
    "logprobs-bool": ({"prompt": "x", "logprobs": True}, 400),
    "echo-string": ({"prompt": "x", "echo": "yes"}, 400),
    "token-id-outside-vocab": ({"prompt": [0, 99999]}, 400),
    "token-id-negative": ({"prompt": [[0, 5], [0, -3]]}, 400),
    "token-id-float": ({"prompt": [0, 5.0]}, 400),
    "empty-prompt-list": ({"prompt": []}, 400),
    "empty-token-list": ({"prompt": [[0, 5], []]}, 400),
    "mixed-prompt-list": ({"prompt": ["a", 1]}, 400),
    "too-many-prompts": ({"prompt": ["a"] * 17}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_json_errors(server, case):
    body, expected = BAD_REQUESTS[case]
    status, result = server.request("/v1/completions", body, method="POST")
    assert status == expected, result
    assert isinstance(result["error"]["message"], str) and result["error"]["message"]
    if case.startswith("logprobs-over"):
        assert result["error"]["param"] == "logprobs" and "20" in result["error"]["message"]


def test_other_errors_and_the_server_survives(server):
    assert server.request("/nowhere")[0] == 404
    assert server.request("/v1/completions", method="GET")[0] == 405
    assert server.request("/health") == (200, {"status": "ok"})
    assert server.proc.poll() is None


def test_concurrent_requests_match_single_requests(server):
    prompts = PROMPTS
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


# ------------------------------------------------------------------------------------------------ logprobs
def network_logprobs(generator: Generator, ids: list[int]) -> np.ndarray:
    """In-process scoring's computation: log-softmax (float64) of the network's logits for the sequence (the
    uncached forward, no padding); row j scores token j + 1."""
    return log_softmax(generator.net(Tensor(np.asarray([ids], dtype=np.int32))).asnumpy()[0])


def top_dict(generator: Generator, row: np.ndarray, n: int, chosen: int) -> dict:
    out = {}
    for token in np.argsort(-row, kind="stable")[:n]:
        out.setdefault(generator.token_text(int(token)), float(row[token]))
    out.setdefault(generator.token_text(chosen), float(row[chosen]))
    return out


def assert_top_close(got: dict, want: dict) -> None:
    assert set(got) == set(want), (got, want)
    for key, value in want.items():
        assert abs(got[key] - value) <= 1e-4, (key, got[key], value)


def test_logprobs_equal_the_in_process_computation(server, generator, served_path):
    body = {"prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 5}
    status, result = server.request("/v1/completions", body)
    assert status == 200, result
    choice = result["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    # the same computation in the test process: equal to the last bit
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
    (c,), _ = served_path.generate_ids([generator.encode(PROMPTS[0])], params)
    assert choice["text"] == c.text and lp["token_logprobs"] == c.logprobs
    assert lp["tokens"] == [generator.token_text(t) for t in c.token_ids]
    assert lp["text_offset"] == [len(generator.decode(c.token_ids[:i])) for i in range(len(c.token_ids))]
    # and the log-softmax of the network's logits for prompt + completion
    ids = c.prompt_ids + c.token_ids
    ref = network_logprobs(generator, ids)
    n = len(c.prompt_ids)
    np.testing.assert_allclose(lp["token_logprobs"], [ref[n - 1 + i, t] for i, t in enumerate(c.token_ids)],
                               atol=1e-4)
    for i, (token, top) in enumerate(zip(c.token_ids, lp["top_logprobs"])):
        assert len(top) <= 6
        assert_top_close(top, top_dict(generator, ref[n - 1 + i], 5, token))


def test_echo_scores_the_prompt(server, generator, served_path):
    """echo + max_tokens 0 + logprobs 1 (how a C-Eval client scores prompt + letter): every prompt token's
    log-probability given the ones before it, as in-process scoring computes it."""
    prompt = "以下是中国关于考试的单项选择题。答案：A"
    ids = generator.encode(prompt)
    ref = network_logprobs(generator, ids)
    for form in (prompt, ids):  # the text and its token ids
        status, result = server.request("/v1/completions", {"prompt": form, "max_tokens": 0, "echo": True,
                                                            "logprobs": 1, "temperature": 0})
        assert status == 200, result
        choice = result["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        assert lp["tokens"] == [generator.token_text(t) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], [ref[j, ids[j + 1]] for j in range(len(ids) - 1)],
                                   atol=1e-4)
        for j in range(1, len(ids)):
            assert_top_close(lp["top_logprobs"][j], top_dict(generator, ref[j - 1], 1, ids[j]))
        assert lp["text_offset"] == [len(generator.decode(ids[:i])) for i in range(len(ids))]
        # the last token (the letter) to the last bit, as the same path computes it in-process
        (c,), _ = served_path.generate_ids([ids], SamplingParams(max_tokens=0, prompt_logprobs=1))
        assert lp["token_logprobs"][-1] == c.prompt_logprobs[-1]
    # echo with a continuation: the prompt's tokens, then the generated ones; the text is prompt + completion
    plain = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                               "ignore_eos": True, "logprobs": 2})[1]["choices"][0]
    status, result = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 3, "temperature": 0,
                                                        "ignore_eos": True, "logprobs": 2, "echo": True})
    echoed = result["choices"][0]
    assert echoed["text"] == prompt + plain["text"]
    assert echoed["logprobs"]["tokens"][len(ids):] == plain["logprobs"]["tokens"]
    # (scoring the prompt runs the final norm and lm_head at every position: the last bits may move)
    np.testing.assert_allclose(echoed["logprobs"]["token_logprobs"][len(ids):], plain["logprobs"]["token_logprobs"],
                               atol=1e-4)
    assert len(echoed["logprobs"]["token_logprobs"]) == len(ids) + 3
    # echo without logprobs: the text only
    result = server.request("/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True})[1]
    assert result["choices"][0]["text"] == prompt and result["choices"][0]["logprobs"] is None


def test_token_id_prompts(server, generator):
    """A list of token ids and a list of such lists: the same answers as the texts they encode."""
    texts = PROMPTS[:3]
    ids = [generator.encode(p) for p in texts]
    common = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    by_text = server.request("/v1/completions", {"prompt": texts, **common})
    by_ids = server.request("/v1/completions", {"prompt": ids, **common})
    assert by_text[0] == by_ids[0] == 200
    assert by_ids[1]["choices"] == by_text[1]["choices"] and by_ids[1]["usage"] == by_text[1]["usage"]
    assert len(by_ids[1]["choices"]) == 3
    single = server.request("/v1/completions", {"prompt": ids[1], **common})[1]
    alone = server.request("/v1/completions", {"prompt": texts[1], **common})[1]
    assert single["choices"] == alone["choices"]
    # a token-id prompt is taken as given: without bos, its answer is its own
    no_bos = server.request("/v1/completions", {"prompt": ids[1][1:], "max_tokens": 0, "echo": True,
                                                "logprobs": 0})[1]
    assert no_bos["usage"]["prompt_tokens"] == len(ids[1]) - 1


def test_concurrent_requests_equal_single_requests_with_logprobs(server):
    """Requests sent together (batched as the scheduler finds them) each get their single-request answer."""
    prompts = ["I love Beijing, because", "我爱北京", "The weather today is", "北京是", "river city model 量化",
               "春天 weather because 我爱 river 北京 上海 花 city today"]
    bodies = [{"prompt": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 3} for p in prompts]
    bodies += [{"prompt": p + " 答案：B", "max_tokens": 0, "echo": True, "logprobs": 1} for p in prompts[:3]]
    alone = [server.request("/v1/completions", b) for b in bodies]
    assert all(status == 200 for status, _ in alone)
    before = server.request("/stats")[1]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: server.request("/v1/completions", b), bodies))
    after = server.request("/stats")[1]
    assert after["requests"] - before["requests"] == len(bodies)
    assert after["prompts"] - before["prompts"] == len(bodies)
    for (status, got), (_, want) in zip(together, alone):
        assert status == 200 and got["usage"] == want["usage"]
        for g, w in zip(got["choices"], want["choices"]):
            assert g["text"] == w["text"] and g["finish_reason"] == w["finish_reason"]
            assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
            assert g["logprobs"]["text_offset"] == w["logprobs"]["text_offset"]
            np.testing.assert_allclose(np.array(g["logprobs"]["token_logprobs"], dtype=float),
                                       np.array(w["logprobs"]["token_logprobs"], dtype=float), atol=1e-4)


def test_engine_runs_the_requests_queued_while_busy_as_one_batch():
    """The scheduler, held inside its first batch until nine more requests are queued: the next batch takes the
    oldest eight (max_batch), the one after the last; every answer equals the prompt run alone."""
    engine = Engine(default_model_path(), max_batch=8)
    try:
        real, sizes = engine.generator.generate_ids, []
        entered, release = threading.Event(), threading.Event()

        def gated(prompts, params, *args, **kwargs):
            sizes.append(len(prompts))
            if len(sizes) == 1:
                entered.set()
                assert release.wait(120)
            return real(prompts, params, *args, **kwargs)

        engine.generator.generate_ids = gated
        texts = ["x", *PROMPTS, "river city model 量化", "春天 weather", "上海 花", "北京 上海 花 city", "答案：C"]
        ids = [engine.generator.encode(t) for t in texts]
        params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2),
                  SamplingParams(max_tokens=0, prompt_logprobs=1)]
        first = engine.submit([ids[0]], params[0])
        assert entered.wait(120)
        futures = [engine.submit([p], params[i % 2]) for i, p in enumerate(ids[1:])]
        release.set()
        results = [f.result(timeout=300) for f in [first, *futures]]
        assert sizes[:3] == [1, 8, 1] and engine.stats["largest_batch"] == 8 and engine.stats["batches"] == 3
        for i, (p, (got,)) in enumerate(zip(ids, results)):
            (want,), _ = real([p], params[0] if i == 0 else params[(i - 1) % 2])
            assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
            np.testing.assert_allclose([x for x in got.prompt_logprobs if x is not None],
                                       [x for x in want.prompt_logprobs if x is not None], atol=1e-4)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ chat
CUSTOM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
                   "{% endif %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def model_copy(src, dst, chat_template: str | None):
    """The model folder with its own tokenizer_config.json (chat_template set or removed); the rest linked."""
    dst.mkdir()
    for path in src.iterdir():
        if path.name != "tokenizer_config.json":
            (dst / path.name).symlink_to(path)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def chat_servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    src = default_model_path()
    with ExitStack() as stack:
        yield {name: stack.enter_context(start_server(str(model_copy(src, tmp / name, template)),
                                                      tmp / f"{name}.log"))
               for name, template in (("custom", CUSTOM_TEMPLATE), ("none", None))}


def test_chat_uses_the_models_template(chat_servers, generator):
    srv = chat_servers["custom"]
    messages = [{"role": "system", "content": "你是考生。"}, {"role": "user", "content": "我爱北京，因为"}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    status, result = srv.request("/v1/chat/completions", body)
    assert status == 200, result
    assert result["id"].startswith("chatcmpl-") and result["object"] == "chat.completion"
    assert result["model"] == srv.model and isinstance(result["created"], int)
    (choice,) = result["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    # the prompt is the folder's template rendered as transformers renders it, tokenized without added tokens
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CUSTOM_TEMPLATE.replace("{{ raise_exception('no tools here') }}", "")).render(
        messages=messages, add_generation_prompt=True)
    assert text.startswith("SYSTEM: 你是考生。\nUSER: ") and text.endswith("ASSISTANT:")
    ids = generator.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    completion = srv.request("/v1/completions", {"prompt": ids, "max_tokens": 5, "temperature": 0,
                                                 "ignore_eos": True})[1]
    assert choice["message"]["content"] == completion["choices"][0]["text"]
    # text parts and max_completion_tokens; logprobs with top_logprobs
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "我爱北京，因为"}]}]
    status, again = srv.request("/v1/chat/completions", {"messages": parts, "max_completion_tokens": 5,
                                                         "temperature": 0, "ignore_eos": True, "logprobs": True,
                                                         "top_logprobs": 2})
    assert status == 200 and again["choices"][0]["message"] == choice["message"]
    content = again["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(e["top_logprobs"]) == 2 for e in content)
    assert all(e["bytes"] == list(e["token"].encode()) and e["logprob"] <= 0 for e in content)
    # what the template refuses is a 400
    status, refused = srv.request("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and "no tools here" in refused["error"]["message"]


def test_chat_without_a_template_is_a_clear_400(chat_servers):
    srv = chat_servers["none"]
    status, result = srv.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}]})
    assert status == 400 and "no chat template" in result["error"]["message"]
    assert result["error"]["code"] == "no_chat_template"
    assert srv.request("/v1/completions", {"prompt": "你好", "max_tokens": 1})[0] == 200


BAD_CHAT = {
    "no-messages": ({"max_tokens": 2}, 400),
    "empty-messages": ({"messages": []}, 400),
    "message-without-role": ({"messages": [{"content": "x"}]}, 400),
    "content-wrong-type": ({"messages": [{"role": "user", "content": 5}]}, 400),
    "top-logprobs-over-20": ({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, 400),
    "top-logprobs-without-logprobs": ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400),
    "stream": ({"messages": [{"role": "user", "content": "x"}], "stream": True}, 400),
    "wrong-model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404),
    "too-long-for-context": ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_requests_get_json_errors(server, case):
    body, expected = BAD_CHAT[case]
    status, result = server.request("/v1/chat/completions", body)
    assert status == expected, result
    assert isinstance(result["error"]["message"], str) and result["error"]["message"]


def test_chat_on_the_default_model(server):
    status, result = server.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "我爱北京"}],
                                                             "max_tokens": 3, "temperature": 0})
    assert status == 200 and result["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= result["usage"]["completion_tokens"] <= 3

