"""C-Eval against served models over real HTTP on loopback.

A stub OpenAI server (``http.server``, in this process) computes completions logprobs from the real embedded
network, so the client's scores can be checked against in-process scores exactly; it also injects 5xx/429
answers and dies mid-job on request. The slow tests run ``goldstick serve`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from goldstick.cli import main
from goldstick.evaluation import ceval_data as cd
from goldstick.evaluation import ceval_run as crun
from goldstick.evaluation import endpoint as ep
from goldstick.evaluation.ceval_jobs import JobError, load_job
from goldstick.quant.numerics import log_softmax
from goldstick.testing.make_model import default_model_path
from goldstick.testing.serve_process import ServeProcess, free_port

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "ceval"
HOST = "127.0.0.1"


# ---- a stub OpenAI server computing logprobs from the real network -------------------------------------------------
class Model:
    """The embedded network and tokenizer, with log-probabilities per position of a token-id sequence."""

    def __init__(self):
        from goldstick.io.loader import load_model
        from goldstick.model.tokenizer import load_tokenizer

        self.dir = default_model_path()
        self.net = load_model(self.dir)
        self.loaded = load_tokenizer(self.dir)
        self.tok = self.loaded.tokenizer
        self.lock = threading.Lock()
        self.memo: dict[tuple, np.ndarray] = {}

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):  # as goldstick serve does: bos + the text's tokens
            return [self.loaded.bos_id] + self.tok.encode(prompt, add_special_tokens=False).ids
        return [int(t) for t in prompt]

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] log-softmax of the logits at every position."""
        from mindspore import Tensor

        key = tuple(ids)
        with self.lock:
            if key not in self.memo:
                logits = self.net(Tensor(np.asarray([ids], dtype=np.int32)), None).asnumpy()[0]
                self.memo[key] = log_softmax(logits.astype(np.float64))
            return self.memo[key]

    def piece(self, token: int) -> str:
        return self.tok.decode([int(token)])


class Stub:
    """``/v1/models``, ``/v1/completions`` (logprobs, echo, greedy text) and ``/v1/chat/completions`` (scripted
    replies) on a loopback port. ``fail``: statuses answered to the first POSTs; ``die_after``: after that many
    answered POSTs the server drops every connection and stops listening."""

    def __init__(self, model: Model, port: int = 0, served: list[str] | None = None, fail=(), die_after=None,
                 chat=None):
        self.model, self.served = model, served if served is not None else ["stub-model"]
        self.fail, self.die_after, self.chat = list(fail), die_after, chat
        self.posts = 0        # POSTs received
        self.admitted = 0     # POSTs to be answered 200
        self.answered = 0     # POSTs answered 200
        self.bodies: list[dict] = []
        self.dead = False
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if stub.dead:
                    self.close_connection = True
                    return
                if self.path == "/v1/models":
                    self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in stub.served]})
                else:
                    self.reply(200 if self.path == "/health" else 404, {"status": "ok"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    if stub.dead or (stub.die_after is not None and stub.admitted >= stub.die_after):
                        self.close_connection = True  # dying: no answer
                        return
                    stub.posts += 1
                    status = stub.fail.pop(0) if stub.fail else 200
                    if status == 200:
                        stub.bodies.append(body)
                        stub.admitted += 1
                if status != 200:
                    headers = {"Retry-After": "0"} if status == 429 else None
                    return self.reply(status, {"error": {"message": f"injected {status}", "type": "server_error"}},
                                      headers)
                if body.get("model") not in stub.served:
                    return self.reply(404, {"error": {"message": f"model {body.get('model')!r} not served"}})
                answer = stub.chat_answer(body) if self.path == "/v1/chat/completions" else stub.completion(body)
                self.reply(200, answer)
                with stub.lock:
                    stub.answered += 1
                    if stub.die_after is not None and stub.answered >= stub.die_after and not stub.dead:
                        stub.dead = True
                        threading.Thread(target=stub.close).start()

        self.httpd = ThreadingHTTPServer((HOST, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{HOST}:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def completion(self, body: dict) -> dict:
        m = self.model
        ids = m.encode(body["prompt"])
        max_tokens, k = int(body.get("max_tokens", 16)), body.get("logprobs")
        seq, generated = list(ids), []
        for _ in range(max_tokens):  # greedy
            nxt = int(np.argmax(m.logprobs(seq)[-1]))
            generated.append(nxt)
            seq.append(nxt)
        logprobs = None
        if k is not None:
            lp = m.logprobs(seq)
            start = 0 if body.get("echo") else len(ids)
            positions = range(start, len(seq))
            tokens = [m.piece(t) for t in seq[start:]]
            token_lps = [None if p == 0 else float(lp[p - 1, seq[p]]) for p in positions]
            tops = []
            for p in positions:
                if p == 0:
                    tops.append(None)
                    continue
                best = np.argsort(-lp[p - 1])[:max(int(k), 1)]
                top = {m.piece(t): float(lp[p - 1, t]) for t in best[::-1]}
                top[m.piece(seq[p])] = float(lp[p - 1, seq[p]])
                tops.append(top)
            offsets, at = [], 0
            for t in tokens:
                offsets.append(at)
                at += len(t)
            logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        text = m.tok.decode(generated)
        return {"id": "cmpl-stub", "object": "text_completion", "model": body["model"],
                "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                          "total_tokens": len(ids) + len(generated)}}

    def chat_answer(self, body: dict) -> dict:
        content = self.chat(body["messages"][-1]["content"])
        return {"id": "chat-stub", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop"}]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def model():
    return Model()


@pytest.fixture
def stubs(model):
    started = []

    def start(**kw) -> Stub:
        stub = Stub(model, **kw)
        started.append(stub)
        return stub

    yield start
    for stub in started:
        if not stub.dead:
            stub.close()


def ceval(*args) -> list[str]:
    return ["ceval", "--data", str(FIXTURE), "--bootstrap", "100", "--no-progress", "--no-plots", *map(str, args)]


def comparable(report: dict) -> dict:
    """The report without timings, paths and request counts: what must not change between runs."""
    models = {k: {kk: vv for kk, vv in v.items() if kk not in ("seconds", "endpoint", "path")}
              for k, v in report["models"].items()}
    return {"models": models, "comparisons": report["comparisons"], "gate": report.get("gate")}


# ---- parsing ------------------------------------------------------------------------------------------------------
def test_endpoint_arguments():
    e = ep.Endpoint.parse("http://127.0.0.1:8000/v1?model=deepseek-r1")
    assert (e.url, e.model, e.label) == ("http://127.0.0.1:8000/v1", "deepseek-r1", "deepseek-r1")
    assert ep.Endpoint.parse("http://h:9/").url == "http://h:9/v1" and ep.Endpoint.parse("http://h:9").label == "h:9"
    with pytest.raises(cd.CEvalError, match="only \\?model="):
        ep.Endpoint.parse("http://h:9/v1?modle=x")
    assert crun.parse_model_arg("q=http://h:9/v1?model=a/b", {"float"}) == ("q", "http://h:9/v1?model=a/b")
    assert crun.parse_model_arg("http://h:9/v1?model=a/b", {"float"}) == ("b", "http://h:9/v1?model=a/b")
    assert crun.parse_model_arg("http://h:9/v1", {"float", "h:9"}) == ("h:9-2", "http://h:9/v1")
    assert isinstance(crun.resolve_model("float=http://h:9/v1"), ep.Endpoint)
    with pytest.raises(cd.CEvalError, match="scoring"):
        ep.EndpointOptions(scoring="vibes").check()


@pytest.mark.parametrize("text, completion, letter", [
    ("经过分析，答案：C", False, "C"),
    ("答案是 B。", False, "B"),
    ("先排除A，答案为：**D**", False, "D"),
    ("<think>答案：A? 再想想</think>最终答案是C", False, "C"),
    ("所以 \\boxed{B}", False, "B"),
    ("\\boxed{\\text{A}} 之后又说 答案：D", False, "D"),
    ("答案：D，但写成 \\boxed{A}", False, "A"),
    ("我选择 C", False, "C"),
    ("The answer is (B).", False, "B"),
    ("ABCD", False, None),
    ("我不知道", False, None),
    ("", False, None),
    ("C\n\n下一题 答案：A", True, "C"),
    (" 甲 ... 答案：B", True, "B"),
])
def test_answer_extraction_rules(text, completion, letter):
    assert ep.extract_answer(text, completion=completion) == letter


def test_letter_forms_are_never_mixed():
    forms = list("ABCD")
    scores, form = ep.letter_scores({"A": -1.0, "C": -2.0, " B": -0.1, "x": -0.5}, forms)
    assert form == "bare" and scores.tolist() == [-1.0, -np.inf, -2.0, -np.inf]  # " B" is not used
    scores, form = ep.letter_scores({" B": -0.1, " D": -3.0}, forms)
    assert form == "spaced" and scores.tolist() == [-np.inf, -0.1, -np.inf, -3.0]
    assert ep.letter_scores({"x": 0.0}, forms)[1] == "none"
    assert ep.spaced(" A") == "A" and ep.spaced("A") == " A"


def test_echoed_answer_tokens():
    ids = {"choices": [{"logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0, -4.0]}}]}
    assert ep.parse_echo(ids, "u", 3, 2, 0) == {"logprob": -7.0, "tokens": 2}  # token ids: by position
    text = {"choices": [{"logprobs": {"tokens": ["<s>", "答案", "：", "A", "x"],
                                      "token_logprobs": [None, -1.0, -2.0, -0.5, -9.0]}}],
            "usage": {"prompt_tokens": 4}}  # a server that generated one token anyway: not part of the answer
    assert ep.parse_echo(text, "u", None, None, 1)["logprob"] == -0.5
    merged = {"choices": [{"logprobs": {"tokens": ["<s>", "答案", "：A"], "token_logprobs": [None, -1.0, -3.0]}}]}
    assert ep.parse_echo(merged, "u", None, None, 1) == {"logprob": -3.0, "tokens": 1}
    with pytest.raises(ep.EndpointError, match="no echoed token_logprobs"):
        ep.parse_echo({"choices": [{"logprobs": None}]}, "u", 3, 1, 0)


def test_answer_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    cache = ep.AnswerCache(path)
    key = ep.AnswerCache.key("http://h/v1", "m", "/completions", {"prompt": "p"})
    cache.put(key, {"answer": {"top": {"A": -1.0}}})
    cache.close()
    with open(path, "a") as f:
        f.write('{"key": "cut sho')  # a kill in the middle of a line
    again = ep.AnswerCache(path)
    assert len(again) == 1 and again.get(key) == {"top": {"A": -1.0}}
    again.put("k2", {"answer": {"x": 1}})
    again.close()
    assert len(ep.AnswerCache(path)) == 2


# ---- against the stub: exact scores -------------------------------------------------------------------------------
def endpoint_run(stub_url: str, questions, requests, prompts, model: Model, token_ids: bool, **options):
    endpoint = ep.connect(ep.Endpoint.parse(stub_url))
    forms = [model.piece(i) for i in cd.letter_token_ids(model.tok)] if token_ids else list(cd.LETTERS)
    return ep.score_endpoint(endpoint, questions, requests, prompts, ep.EndpointOptions(**options),
                             ep.AnswerCache(None), "ep", letter_forms=forms,
                             letter_ids=cd.letter_token_ids(model.tok), token_ids=token_ids, progress=False)


@pytest.mark.parametrize("token_ids", [True, False], ids=["token-ids", "text"])
def test_stub_scores_equal_in_process_scores(stubs, model, token_ids):
    """With --letter-fallback echo every letter's exact logprob comes back, even though a random tiny model rarely
    has A-D in its top 20: the scores are the in-process log-probabilities, question by question."""
    data = cd.load_ceval(FIXTURE, "val", shots=1, limit=3)
    questions = data.questions()
    requests, letters = cd.tokenize_requests(model.tok, questions, data.dev, 1, model.loaded.bos_id, 1023)
    prompts = [cd.build_prompt(q, data.dev[q.subject][:r.shots]) for q, r in zip(questions, requests)]
    # in-process: the network's logits at the last prompt position (batched, left-padded), as log-probabilities
    from mindspore import Tensor

    expected = np.stack([log_softmax(model.net(Tensor(np.asarray([r.ids], dtype=np.int32)), None)
                                     .asnumpy()[0, -1].astype(np.float64))[letters] for r in requests])
    stub = stubs()
    run = endpoint_run(stub.url, questions, requests, prompts, model, token_ids, letter_fallback="echo")
    np.testing.assert_allclose(run.scores, expected, atol=1e-4)
    assert run.details["letter_scores_missing"] == 0 and run.details["echo_requests"] > 0
    sent = [b["prompt"] for b in stub.bodies if not b.get("echo")]
    assert all(isinstance(p, list) for p in sent) if token_ids else all(isinstance(p, str) for p in sent)
    # without the fallback: the letters in the top 20 are exact, the others -inf, and counted
    plain = endpoint_run(stub.url, questions, requests, prompts, model, token_ids)
    present = np.isfinite(plain.scores)
    np.testing.assert_allclose(plain.scores[present], expected[present], atol=1e-4)
    assert plain.details["letter_scores_missing"] == int((~present).sum()) > 0


def test_cli_local_against_stub_endpoint(stubs, model, tmp_path):
    """The float model in-process against the same network behind the stub: Δ 0, no flip, KL ~0; the report
    names the endpoint and counts its requests; a second run answers from the cache."""
    stub = stubs()
    out = tmp_path / "r"
    argv = ceval("--model", model.dir, "--quantized", f"served={stub.url}", "--tokenizer", model.dir,
                 "--letter-fallback", "echo", "--limit", "4", "--out", out, "--allowed-drop", "0")
    assert main(argv) == 0
    report = json.loads((out / "ceval.json").read_text())
    c = report["comparisons"]["served"]
    assert c["delta_points"] == 0 and c["flip_rate"] == 0 and c["kl"]["max"] < 1e-6 and c["kl"]["questions"] == 20
    e = report["models"]["served"]["endpoint"]
    assert e["served_model"] == "stub-model" and e["prompts"] == "token ids" and e["answers_from_cache"] == 0
    assert e["answers_fetched"] == stub.answered == 20 + e["echo_requests"]
    assert report["models"]["served"]["scoring"] == "logprobs"
    lines = (out / ep.CACHE_FILE).read_text().splitlines()
    assert len(lines) == stub.answered and all(json.loads(x)["url"] == stub.url for x in lines)
    md = (out / "ceval.md").read_text()
    assert "## Served models" in md and stub.url in md
    before = stub.posts
    assert main(argv) == 0
    assert stub.posts == before  # everything from the cache
    again = json.loads((out / "ceval.json").read_text())
    assert comparable(again) == comparable(report)
    assert again["models"]["served"]["endpoint"]["answers_from_cache"] == e["answers_fetched"]


def test_served_model_must_be_named_when_several(stubs, capsys):
    stub = stubs(served=["a", "b"])
    assert main(ceval("--model", stub.url, "--limit", "1")) == 2
    err = capsys.readouterr().err
    assert f"{stub.url}: /v1/models lists 2 models (a, b)" in err and "?model=SERVED_NAME" in err
    report = crun.run_ceval(f"float={stub.url}?model=b", [f"{stub.url}?model=a"], data=FIXTURE, limit=1,
                            progress=False, plots=False, bootstrap_samples=50)
    assert report["models"]["float"]["endpoint"]["served_model"] == "b"
    assert report["models"]["a"]["endpoint"]["served_model"] == "a"
    assert report["settings"]["tokenizer"] is None  # endpoints only, no --tokenizer: text prompts
    none = stubs(served=[])
    assert main(ceval("--model", none.url, "--limit", "1")) == 2
    assert "lists 0 models" in capsys.readouterr().err


# ---- robustness ---------------------------------------------------------------------------------------------------
def test_5xx_and_429_are_retried(stubs, model, tmp_path):
    stub = stubs(fail=[503, 500, 429, 502])
    out = tmp_path / "r"
    assert main(ceval("--model", model.dir, "--quantized", f"q={stub.url}", "--limit", "2",
                      "--concurrency", "2", "--out", out)) == 0
    e = json.loads((out / "ceval.json").read_text())["models"]["q"]["endpoint"]
    assert e["retries"] == 4 and stub.posts == 10 + 4 and e["answers_fetched"] == 10


def test_dead_endpoint_is_one_error_line_naming_the_url(capsys):
    url = f"http://{HOST}:{free_port()}/v1"
    assert main(ceval("--model", url, "--retries", "1", "--limit", "1")) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("goldstick: error:")]
    assert len(errors) == 1 and url in errors[0] and "connection refused" in errors[0]


def test_server_dying_mid_job_keeps_answers_and_a_rerun_sends_only_the_rest(stubs, model, tmp_path, capsys):
    reference = tmp_path / "reference"
    full = stubs()
    args = ("--model", model.dir, "--concurrency", "3", "--limit", "4")
    assert main(ceval(*args, "--quantized", f"q={full.url}", "--out", reference)) == 0
    total = full.answered
    assert total == 20

    port = free_port()
    dying = stubs(port=port, die_after=7)
    out = tmp_path / "r"
    argv = ceval(*args, "--quantized", f"q={dying.url}", "--out", out, "--retries", "1")
    assert main(argv) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("goldstick: error:")]
    assert len(errors) == 1 and dying.url in errors[0] and "a rerun sends only the missing requests" in errors[0]
    kept = (out / ep.CACHE_FILE).read_text().splitlines()
    assert len(kept) == 7

    restarted = stubs(port=port)  # the same URL: the cache's answers apply
    assert main(argv) == 0
    assert restarted.posts == total - 7
    report = json.loads((out / "ceval.json").read_text())
    assert comparable(report) == comparable(json.loads((reference / "ceval.json").read_text()))
    assert report["models"]["q"]["endpoint"]["answers_from_cache"] == 7


# ---- generation scoring -------------------------------------------------------------------------------------------
def test_generate_scoring_extracts_answers_and_counts_the_unparsed(stubs, model, tmp_path):
    data = cd.load_ceval(FIXTURE, "val", limit=2)
    answers = {cd.build_prompt(q): q.answer for q in data.questions()}
    replies = {}

    def chat(prompt: str) -> str:
        i = len(replies)
        right = answers[prompt]
        wrong = "ABCD"[("ABCD".index(right) + 1) % 4]
        reply = [f"<think>也许是{wrong}</think>答案：{right}", f"所以 \\boxed{{{wrong}}}", "我不确定这道题。"][i % 3]
        replies[prompt] = reply
        return reply

    stub = stubs(chat=chat)
    out = tmp_path / "r"
    assert main(ceval("--model", model.dir, "--quantized", f"reasoner={stub.url}", "--scoring", "generate",
                      "--max-tokens", "64", "--limit", "2", "--out", out, "--concurrency", "1")) == 0
    report = json.loads((out / "ceval.json").read_text())
    e = report["models"]["reasoner"]["endpoint"]
    assert e["unparsed"] == 3 and len(e["unparsed_examples"]) == 3 and e["api"] == "chat"
    assert report["models"]["reasoner"]["n_correct"] == 4  # the first of every three replies
    assert all(b["max_tokens"] == 64 and b["messages"][0]["content"] in answers for b in stub.bodies)
    assert report["comparisons"]["reasoner"]["kl"]["mean"] is None
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sum(p["predictions"]["reasoner"] is None for p in preds) == 3
    md = (out / "ceval.md").read_text()
    assert "not measured" in md and "3 generated answer(s) had no parsable letter" in md


def test_job_file_with_endpoints(stubs, model, tmp_path):
    stub = stubs()
    job = tmp_path / "job.yaml"
    job.write_text(f"name: served\nmodel: {model.dir}\nquantized: {{q: '{stub.url}?model=stub-model'}}\n"
                   f"tokenizer: {model.dir}\ndata: {FIXTURE}\nlimit: 2\nbootstrap_samples: 50\n"
                   f"endpoint: {{letter_fallback: echo, concurrency: 2}}\nout: {tmp_path / 'out'}\n")
    loaded = load_job(job)
    assert loaded.quantized == {"q": f"{stub.url}?model=stub-model"} and loaded.endpoint_options().concurrency == 2
    assert main(["ceval", str(job), "--no-progress", "--no-plots"]) == 0
    report = json.loads((tmp_path / "out" / "ceval.json").read_text())
    assert report["comparisons"]["q"]["flip_rate"] == 0 and report["job"]["endpoint"]["letter_fallback"] == "echo"
    job.write_text(job.read_text() + "recipe: deepseek-r1-w8a16\n")
    job.write_text(job.read_text().replace(f"model: {model.dir}", f"model: {stub.url}"))
    with pytest.raises(JobError, match="recipe: quantizing needs the float model as a checkpoint folder"):
        load_job(job)
    job.write_text(f"quantized: {stub.url}\nendpoint: {{concurency: 2}}\n")
    with pytest.raises(JobError, match="unknown key.*concurency"):
        load_job(job)


# ---- goldstick serve ----------------------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    started = []

    def start(port: int | None = None) -> ServeProcess:
        s = ServeProcess(default_model_path(), tmp_path / "serve.log", port=port)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


@pytest.mark.slow
def test_goldstick_serve_scores_equal_in_process_scores(served, model, tmp_path):
    """The float model in-process and behind goldstick serve: per question the same four probabilities (the letters
    outside the top 20 scored by echo) and the same answer."""
    server = served()
    out = tmp_path / "r"
    assert main(ceval("--model", model.dir, "--quantized", f"served={server.url}", "--out", out,
                      "--letter-fallback", "echo")) == 0
    report = json.loads((out / "ceval.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 30
    for p in preds:
        np.testing.assert_allclose(p["probabilities"]["served"], p["probabilities"]["float"], atol=1e-4)
        assert p["predictions"]["served"] == p["predictions"]["float"]
    e = report["models"]["served"]["endpoint"]
    assert e["letter_scores_missing"] == 0 and e["answers_fetched"] > 0
    assert report["comparisons"]["served"]["flip_rate"] == 0


@pytest.mark.slow
def test_goldstick_serve_killed_mid_job_and_restarted(served, model, tmp_path, capsys):
    """SIGKILL the server while a job runs: exit 2 naming the URL, the answers so far kept; restarted on the same
    port, the rerun completes with the report of an uninterrupted run and sends only the missing requests."""
    port = free_port()
    server = served(port)
    base = ["--model", model.dir, "--quantized", f"served={server.url}", "--concurrency", "1"]
    reference = tmp_path / "reference"
    assert main(ceval(*base, "--out", reference)) == 0
    total = json.loads((reference / "ceval.json").read_text())["models"]["served"]["endpoint"]["answers_fetched"]

    out = tmp_path / "r"
    cache = out / ep.CACHE_FILE
    cmd = [sys.executable, "-m", "goldstick.cli", *ceval(*base, "--out", out, "--retries", "1")]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and job.poll() is None:
        if cache.is_file() and len(cache.read_text().splitlines()) >= 5:
            server.kill()
            break
        time.sleep(0.005)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 2, err
    errors = [x for x in err.splitlines() if x.startswith("goldstick: error:")]
    assert len(errors) == 1 and server.url in errors[0]
    kept = len(cache.read_text().splitlines())
    assert 5 <= kept < total

    served(port)  # restarted on the same port
    assert main(ceval(*base, "--out", out)) == 0
    report = json.loads((out / "ceval.json").read_text())
    e = report["models"]["served"]["endpoint"]
    assert e["answers_from_cache"] == kept and e["answers_fetched"] == total - kept
    assert comparable(report) == comparable(json.loads((reference / "ceval.json").read_text()))


REAL_CEVAL = os.environ.get("GOLDSTICK_CEVAL_DIR")


@pytest.mark.slow
@pytest.mark.skipif(not REAL_CEVAL, reason="set GOLDSTICK_CEVAL_DIR to a folder with the real C-Eval CSVs")
def test_real_ceval_through_two_goldstick_servers_equals_in_process(tmp_path, capsys):
    """benchmarks/ceval_served.py on real val subjects: the float and a quantized model, each behind its own
    goldstick serve, score per subject and per question as in-process; the quantized server, killed mid-job, gives
    exit 2 naming it, and after a restart the rerun fetches only what is missing."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ceval_served

    rc = ceval_served.main(["--data", REAL_CEVAL, "--subjects", "computer_network,modern_chinese_history,law",
                            "--limit", "8", "--recipe", "deepseek-r1-w8a8-dynamic", "--kill-after", "6",
                            "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for label in ("float", "quantized"):
        assert f"{label}: subjects with equal accuracy 3/3, answers differing 0/24" in out
    assert "kill: exit 2, 1 error line" in out


@pytest.mark.slow
def test_generate_scoring_through_goldstick_serve_chat(served, model, tmp_path):
    """--scoring generate against goldstick serve's /v1/chat/completions: every reply is the greedy continuation of
    the question rendered with the model's chat template, as computed in the test process."""
    from goldstick.serve.chat import ChatTemplate
    from goldstick.serve.generate import Generator, SamplingParams
    from goldstick.serve.host_ops import host_primitives

    server = served()
    out = tmp_path / "r"
    assert main(ceval("--model", model.dir, "--quantized", f"served={server.url}", "--scoring", "generate",
                      "--max-tokens", "6", "--limit", "2", "--out", out)) == 0
    report = json.loads((out / "ceval.json").read_text())
    e = report["models"]["served"]["endpoint"]
    assert e["api"] == "chat" and e["answers_fetched"] == report["models"]["served"]["n_questions"]
    assert 0 <= e["unparsed"] <= report["models"]["served"]["n_questions"]
    cached = [json.loads(x) for x in (out / ep.CACHE_FILE).read_text().splitlines()]
    assert cached and all(c["kind"] == "generate" for c in cached)

    generator = Generator.from_dir(default_model_path())
    host_primitives(generator.net)
    template = ChatTemplate.from_dir(default_model_path())
    data = cd.load_ceval(FIXTURE, "val", limit=2)
    by_prompt = {c["prompt_sha256"]: c["answer"]["text"] for c in cached}
    checked = 0
    for q in list(data.questions())[:3]:
        prompt = cd.build_prompt(q)
        text = template.render([{"role": "user", "content": prompt}])
        ids = generator.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
        (c,), _ = generator.generate_ids([ids], SamplingParams(max_tokens=6, temperature=0))
        assert by_prompt[ep.sha256_json(prompt)] == c.text
        checked += 1
    assert checked == 3
