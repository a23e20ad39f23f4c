"""C-Eval against a served model: any OpenAI-compatible endpoint (vllm-mindspore, vLLM, ``goldstick serve``).

A model argument ``NAME=http://HOST:PORT/v1`` (optionally ``?model=SERVED_NAME``; without it, the one model that
``GET /v1/models`` lists) is scored over HTTP instead of in-process. Prompts are the in-process prompts: sent as
token-id lists when a local tokenizer is given (``--tokenizer``), else as text.

Scoring ``logprobs`` (the default): one ``/v1/completions`` request per question with ``max_tokens: 1``,
``temperature: 0``, ``logprobs: 20``; the A-D scores come from ``top_logprobs`` of the first generated token:

* the letter forms compared are the ones in-process scoring compares: the token that encoding the letter alone
  gives (``ceval_data.letter_token_ids``; with a local tokenizer its decoded text, else the bare ``A``..``D``);
* a question whose four bare letters are all absent from the top 20, but whose letters with a leading space
  (``" A"``..``" D"``) are not, is scored on the spaced forms, all four letters of it (counted); the two forms are
  never mixed within a question, so wherever any bare letter is in the top 20 the scores are exactly the in-process
  ones (the model's log-probabilities instead of its logits: the same A-D softmax, argmax and KL);
* a letter absent from the top 20 scores -inf (counted in the report), unless ``letter_fallback="echo"``: then
  its exact log-probability is asked for with ``prompt + letter``, ``echo: true, max_tokens: 0, logprobs: 1``
  (the log-probability of the last echoed token; with a text prompt, of the echoed tokens that cover the letter),
  and the spaced forms are never used: the scores equal in-process scores on any model.

A question whose letter merges with the token before it (in-process: the continuation likelihoods) is scored,
with a local tokenizer, by echoing its four continuations.

Scoring ``generate`` (reasoning models): a chat completion (the server's chat template) or a completion with
``max_tokens`` as the budget at temperature 0; the answer is ``extract_answer`` of the reply. A reply with no
answer counts as wrong; the report counts and shows such replies. KL exists only where logprobs do.

Requests run ``concurrency`` at a time, each with a ``timeout``; 429, 5xx and connection errors are retried with
exponential backoff (``backoff`` seconds, doubling, at most 30 s; a ``Retry-After`` header is honoured). Every
answer is appended to the answer cache (one JSON line, flushed) keyed by the endpoint URL, the served model and
the request (prompt and parameters), so a rerun sends only what is missing. An endpoint still failing after its
retries is one ``EndpointError`` naming its URL; the answers so far stay in the cache.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from tqdm import tqdm

from goldstick.evaluation.ceval_data import LETTERS, CEvalError, Question, Request
from goldstick.evaluation.ceval_scoring import ModelRun

TOP_LOGPROBS = 20
SCORINGS = ("logprobs", "generate")
LETTER_FALLBACKS = ("none", "echo")
APIS = ("chat", "completions")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF = 30.0
CACHE_FILE = "endpoint-answers.jsonl"
NEG_INF = float("-inf")


class EndpointError(CEvalError):
    """A served model that cannot be scored: unreachable after its retries, a refused request, or a response
    without what the scoring needs. The message names the endpoint's URL."""


class StoppedError(Exception):
    """A request abandoned because another one has already failed the run."""


def is_endpoint(text) -> bool:
    """Is a model argument an endpoint (``http://`` or ``https://``) rather than a checkpoint folder?"""
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


# ---- endpoints ---------------------------------------------------------------------------------------------------
@dataclass
class Endpoint:
    """An OpenAI-compatible API base (``http://HOST:PORT/v1``) and the served model to ask for."""

    url: str
    model: str | None = None
    max_model_len: int | None = None

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``http://HOST:PORT/v1[?model=SERVED_NAME]``; a URL without a path gets ``/v1``."""
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CEvalError(f"{text!r}: not an endpoint URL (expected http://HOST:PORT/v1[?model=SERVED_NAME])")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise CEvalError(f"{text!r}: the port is not a number") from None
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"model"})
        if unknown:
            raise CEvalError(f"{text!r}: unknown query parameter(s) {', '.join(unknown)} (only ?model=SERVED_NAME)")
        model = (query.get("model") or [""])[-1] or None
        path = parts.path.rstrip("/") or "/v1"
        return cls(url=f"{parts.scheme}://{parts.netloc}{path}", model=model)

    @property
    def label(self) -> str:
        """A default report label: the served model's last path component, else ``HOST:PORT``."""
        if self.model:
            return self.model.rstrip("/").rpartition("/")[2] or self.model
        return urlsplit(self.url).netloc

    def __str__(self) -> str:
        return self.url + (f"?model={self.model}" if self.model else "")


@dataclass
class EndpointOptions:
    """How served models are scored (``goldstick ceval`` options, or a job's ``endpoint:`` mapping)."""

    scoring: str = "logprobs"       # logprobs | generate
    letter_fallback: str = "none"   # none | echo: exact logprobs for letters absent from the top 20
    api: str = "chat"               # generate: chat (the server's chat template) | completions
    max_tokens: int = 4096          # generate: the budget per answer
    concurrency: int = 8            # requests in flight
    timeout: float = 600.0          # seconds per request
    retries: int = 5                # after the first attempt, on 429, 5xx and connection errors
    backoff: float = 0.5            # seconds before the first retry; doubles, at most MAX_BACKOFF

    def check(self) -> EndpointOptions:
        def bad(name: str, why: str) -> CEvalError:
            return CEvalError(f"endpoint option {name}: {getattr(self, name)!r} {why}")

        if self.scoring not in SCORINGS:
            raise bad("scoring", f"is not one of {', '.join(SCORINGS)}")
        if self.letter_fallback not in LETTER_FALLBACKS:
            raise bad("letter_fallback", f"is not one of {', '.join(LETTER_FALLBACKS)}")
        if self.api not in APIS:
            raise bad("api", f"is not one of {', '.join(APIS)}")
        for name in ("max_tokens", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "is not a positive integer")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise bad("retries", "is not a non-negative integer")
        for name in ("timeout", "backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (name == "timeout" and value == 0):
                raise bad(name, "is not a positive number of seconds")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


# ---- HTTP --------------------------------------------------------------------------------------------------------
def _error_message(payload: bytes) -> str:
    """The message of an OpenAI-shaped error body (or the body's start)."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload[:200].decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(body)[:300]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


class Client:
    """JSON requests to one API base over HTTP/1.1: a kept-alive connection per thread, retries with backoff."""

    def __init__(self, url: str, timeout: float = 600.0, retries: int = 5, backoff: float = 0.5,
                 stop: threading.Event | None = None):
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.base_path = parts.path.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.stop = stop or threading.Event()
        self.attempts = 0     # HTTP requests made (retries included)
        self.retried = 0      # of which retries
        self._lock = threading.Lock()
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = self._local.conn = kind(self.host, self.port, timeout=self.timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, path: str, data: bytes | None):
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for again in (False, True):
            conn = self._connection()
            reused = conn.sock is not None
            with self._lock:
                self.attempts += 1
            try:
                conn.request(method, self.base_path + path, body=data, headers=headers)
                response = conn.getresponse()
                payload = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop()
                if reused and not again:  # the server closed a kept-alive connection: reconnect once, at once
                    continue
                raise
            except BaseException:
                self._drop()
                raise
            if response.will_close:
                self._drop()
            return response.status, payload, response.headers
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), 2 * MAX_BACKOFF)
            except ValueError:
                pass
        return min(self.backoff * 2 ** attempt, MAX_BACKOFF) * random.uniform(0.8, 1.2)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer of one request; retries 429, 5xx and connection errors, raises ``EndpointError``."""
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        last, delay = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retried += 1
                if self.stop.wait(delay):
                    raise StoppedError()
            if self.stop.is_set():
                raise StoppedError()
            try:
                status, payload, headers = self._once(method, path, data)
            except (OSError, http.client.HTTPException) as exc:
                last, delay = _describe(exc), self._delay(attempt, None)
                continue
            if status == 200:
                try:
                    answer = json.loads(payload)
                except ValueError:
                    raise EndpointError(f"{self.url}{path}: the answer is not JSON "
                                        f"({payload[:80].decode('utf-8', 'replace')!r})") from None
                if not isinstance(answer, dict):
                    raise EndpointError(f"{self.url}{path}: the answer is not a JSON object")
                return answer
            message = _error_message(payload)
            if status in RETRY_STATUS:
                last = f"HTTP {status}" + (f" ({message})" if message else "")
                delay = self._delay(attempt, headers.get("Retry-After"))
                continue
            raise EndpointError(f"{self.url}{path}: HTTP {status}: {message or 'no message'}")
        raise EndpointError(f"{self.url}{path}: still failing after {self.retries} retries ({last})")


def connect(endpoint: Endpoint, options: EndpointOptions | None = None) -> Endpoint:
    """The endpoint with its served model resolved through ``GET /v1/models`` (and its ``max_model_len`` when the
    listing gives one, as vLLM's does)."""
    options = options or EndpointOptions()
    client = Client(endpoint.url, timeout=min(options.timeout, 60.0), retries=options.retries,
                    backoff=options.backoff)
    listing = client.call("GET", "/models")
    data = listing.get("data")
    if not isinstance(data, list) or not all(isinstance(m, dict) and m.get("id") for m in data):
        raise EndpointError(f"{endpoint.url}/models: not an OpenAI model list ({{'data': [{{'id': ...}}]}})")
    ids = [str(m["id"]) for m in data]
    if endpoint.model is None:
        if len(ids) != 1:
            listed = f" ({', '.join(ids[:6])}{', ...' if len(ids) > 6 else ''})" if ids else ""
            raise EndpointError(f"{endpoint.url}: /v1/models lists {len(ids)} models{listed}; name the one to "
                                f"evaluate with {endpoint.url}?model=SERVED_NAME")
        model = ids[0]
    else:
        model = endpoint.model
    info = next((m for m in data if m["id"] == model), {})
    limit = info.get("max_model_len")
    return Endpoint(url=endpoint.url, model=model,
                    max_model_len=int(limit) if isinstance(limit, int) and not isinstance(limit, bool) else None)


# ---- the answer cache --------------------------------------------------------------------------------------------
def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class AnswerCache:
    """Answers received, one JSON line each (``key``, ``url``, ``model``, ``kind``, ``prompt_sha256``, ``answer``),
    appended and flushed as they arrive. ``key`` is the sha256 of the endpoint URL, the served model, the request
    path and the request body (prompt and parameters). A line cut short by a kill is ignored. ``path`` None: kept
    in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._handle = None
        if self.path is not None and self.path.is_file():
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                        self.answers[str(record["key"])] = record["answer"]
                    except (ValueError, KeyError, TypeError):
                        continue

    @staticmethod
    def key(url: str, model: str | None, path: str, body: dict) -> str:
        return sha256_json([url, model, path, body])

    def __len__(self) -> int:
        return len(self.answers)

    def get(self, key: str) -> dict | None:
        return self.answers.get(key)

    def put(self, key: str, record: dict) -> None:
        with self._lock:
            self.answers[key] = record["answer"]
            if self.path is None:
                return
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torn = False
                if self.path.is_file() and self.path.stat().st_size:
                    with open(self.path, "rb") as handle:
                        handle.seek(-1, 2)
                        torn = handle.read(1) != b"\n"
                self._handle = open(self.path, "a", encoding="utf-8")
                if torn:  # the last line was cut short: start a new one
                    self._handle.write("\n")
            self._handle.write(json.dumps({"key": key, **record}, ensure_ascii=False) + "\n")
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None


# ---- letters and answers -----------------------------------------------------------------------------------------
def spaced(form: str) -> str:
    """The other form of a letter token's text: with a leading space added, or removed."""
    return form[1:] if form.startswith(" ") else " " + form


def letter_scores(top: dict[str, float], forms: Sequence[str]) -> tuple[np.ndarray, str]:
    """A-D scores from the first generated token's top logprobs, and the form used: ``bare`` (``forms``, what
    in-process scoring compares), ``spaced`` (all four bare letters absent, some spaced one present) or ``none``.
    Absent letters score -inf."""
    bare = np.array([float(top.get(f, NEG_INF)) for f in forms])
    if np.isfinite(bare).any():
        return bare, "bare"
    other = np.array([float(top.get(spaced(f), NEG_INF)) for f in forms])
    if np.isfinite(other).any():
        return other, "spaced"
    return bare, "none"


_ANSWER = re.compile(r"答案\s*(?:是|为|為|应为|应该是)?\s*[：:]?\s*(?:选项)?\s*[(（\[【]?\s*\**\s*([A-D])(?![A-Za-z])")
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm)\s*\{\s*)?([A-D])\s*\}")
_LONE_END = re.compile(r"(?:^|[^A-Za-z])([A-D])[\s.。．、)）\]】*`'\"」』]*$")
_LONE_START = re.compile(r"\s*[*(（\[【]*\s*([A-D])(?![A-Za-z])")


def extract_answer(text: str | None, completion: bool = False) -> str | None:
    """The answer letter of a generated reply, or None. Rules, on the text after the last ``</think>``:

    1. ``completion`` (the reply continues the prompt right after ``答案：``): a letter at its very start;
    2. the last ``答案：X`` / ``答案是X`` / ``答案为X`` (optional colon, ``选项``, bracket or ``**`` before X) or
       ``\\boxed{X}`` (also ``\\boxed{\\text{X}}``), whichever comes last;
    3. a lone letter at the end (not part of a word; trailing spaces, punctuation, brackets or ``*`` allowed).
    """
    if not text:
        return None
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if completion:
        start = _LONE_START.match(text)
        if start:
            return start.group(1)
    hits = [(m.start(), m.group(1)) for pattern in (_ANSWER, _BOXED) for m in pattern.finditer(text)]
    if hits:
        return max(hits)[1]
    end = _LONE_END.search(text.strip())
    return end.group(1) if end else None


def _choice(response: dict, url: str) -> dict:
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise EndpointError(f"{url}: the answer has no choices")
    return choices[0]


def parse_top(response: dict, url: str) -> dict:
    """``{"top": {token: logprob}, "text": ...}`` of the first generated token of a completions answer."""
    choice = _choice(response, url)
    logprobs = choice.get("logprobs") or {}
    tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not tops or not isinstance(tops, list) or tops[0] is None:
        raise EndpointError(f"{url}/completions: the answer has no top_logprobs (the server must support "
                            f"'logprobs' on /v1/completions; or score with --scoring generate)")
    first = tops[0]
    if isinstance(first, list):  # [{"token", "logprob"}, ...]
        first = {str(e.get("token")): e.get("logprob") for e in first if isinstance(e, dict)}
    top = {str(k): float(v) for k, v in first.items() if v is not None}
    return {"top": top, "text": choice.get("text")}


def parse_echo(response: dict, url: str, start: int | None, count: int | None, chars: int) -> dict:
    """The summed logprob of the echoed tokens that are not prompt: tokens ``start .. start+count`` (a token-id
    prompt), or the fewest last echoed prompt tokens whose text covers the last ``chars`` characters (text)."""
    choice = _choice(response, url)
    logprobs = choice.get("logprobs") or {}
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or not values:
        raise EndpointError(f"{url}/completions: no echoed token_logprobs (the server must support 'echo' with "
                            f"'logprobs' on /v1/completions for --letter-fallback echo)")
    if start is None:
        used = (response.get("usage") or {}).get("prompt_tokens")
        n = used if isinstance(used, int) and 0 < used <= len(values) else len(values)
        if not isinstance(tokens, list) or len(tokens) < n:
            raise EndpointError(f"{url}/completions: echoed logprobs without their tokens")
        start, covered = n, 0
        while covered < chars and start > 1:
            start -= 1
            covered += len(str(tokens[start]))
        count = n - start
    picked = values[start:start + count]
    if len(picked) != count or any(v is None for v in picked):
        raise EndpointError(f"{url}/completions: echoed logprobs are missing for the answer's tokens")
    return {"logprob": float(sum(picked)), "tokens": count}


# ---- scoring -----------------------------------------------------------------------------------------------------
def score_endpoint(endpoint: Endpoint, questions: Sequence[Question], requests: Sequence[Request],
                   prompts: Sequence[str], options: EndpointOptions, cache: AnswerCache, label: str,
                   letter_forms: Sequence[str] = LETTERS, letter_ids: Sequence[int] | None = None,
                   token_ids: bool = False, progress: bool = True) -> ModelRun:
    """Score every question on a served model; a ``ModelRun`` like in-process scoring's, with ``details``.

    ``prompts`` are the texts of ``requests`` (same shots); ``token_ids``: send ``requests[i].ids`` instead (then
    ``letter_ids`` are the letters' token ids, and ``letter_forms`` their decoded texts).
    """
    options.check()
    if endpoint.model is None:
        raise EndpointError(f"{endpoint.url}: the served model is not resolved (connect first)")
    stop = threading.Event()
    client = Client(endpoint.url, timeout=options.timeout, retries=options.retries, backoff=options.backoff,
                    stop=stop)
    counts = {"cached": 0, "fetched": 0}
    lock = threading.Lock()

    def ask(kind: str, path: str, body: dict, parse: Callable[[dict], dict], prompt) -> dict:
        body = {"model": endpoint.model, **body}
        key = AnswerCache.key(endpoint.url, endpoint.model, path, body)
        hit = cache.get(key)
        if hit is not None:
            with lock:
                counts["cached"] += 1
            return hit
        answer = parse(client.call("POST", path, body))
        cache.put(key, {"url": endpoint.url, "model": endpoint.model, "kind": kind,
                        "prompt_sha256": sha256_json(prompt), "answer": answer})
        with lock:
            counts["fetched"] += 1
        return answer

    def prompt_of(i: int):
        return [int(t) for t in requests[i].ids] if token_ids else prompts[i]

    def echo(i: int, letter: int | None, continuation: list[int] | None = None) -> float:
        if token_ids:
            ids = prompt_of(i)
            tail = continuation if continuation is not None else [int(letter_ids[letter])]
            prompt, start, count, chars = ids + [int(t) for t in tail], len(ids), len(tail), 0
        else:
            form = letter_forms[letter]
            prompt, start, count, chars = prompts[i] + form, None, None, len(form)
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
        return ask("echo", "/completions", body,
                   lambda r: parse_echo(r, endpoint.url, start, count, chars), prompt)["logprob"]

    def score_logprobs(i: int) -> tuple[np.ndarray, dict]:
        req = requests[i]
        if token_ids and req.continuations is not None:  # the letter merges with the prompt's last token
            return np.array([echo(i, j, c) for j, c in enumerate(req.continuations)]), {"form": "continuation",
                                                                                         "echo": 4}
        prompt = prompt_of(i)
        body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
        top = ask("top", "/completions", body, lambda r: parse_top(r, endpoint.url), prompt)["top"]
        if options.letter_fallback == "echo":
            scores = np.array([float(top.get(f, NEG_INF)) for f in letter_forms])
            absent = [j for j in range(4) if not np.isfinite(scores[j])]
            for j in absent:
                scores[j] = echo(i, j)
            return scores, {"form": "bare", "echo": len(absent), "missing": 0}
        scores, form = letter_scores(top, letter_forms)
        return scores, {"form": form, "echo": 0, "missing": int((~np.isfinite(scores)).sum())}

    def score_generate(i: int) -> tuple[np.ndarray, dict]:
        if options.api == "chat":
            body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": options.max_tokens,
                    "temperature": 0}
            path, prompt = "/chat/completions", prompts[i]

            def parse(r: dict) -> dict:
                choice = _choice(r, endpoint.url)
                message = choice.get("message") or {}
                return {"text": message.get("content") or "", "finish_reason": choice.get("finish_reason")}
        else:
            prompt = prompt_of(i)
            body = {"prompt": prompt, "max_tokens": options.max_tokens, "temperature": 0}
            path = "/completions"

            def parse(r: dict) -> dict:
                choice = _choice(r, endpoint.url)
                return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason")}
        answer = ask("generate", path, body, parse, prompt)
        letter = extract_answer(answer["text"], completion=options.api == "completions")
        scores = np.full(4, NEG_INF)
        if letter is not None:
            scores[LETTERS.index(letter)] = 0.0
        return scores, {"unparsed": letter is None, "length": answer.get("finish_reason") == "length",
                        "text": answer["text"]}

    one = score_logprobs if options.scoring == "logprobs" else score_generate
    n = len(questions)
    scores = np.full((n, 4), NEG_INF)
    infos: list[dict] = [{} for _ in range(n)]
    started = time.time()
    bar = tqdm(total=n, desc=label, unit="q", file=sys.stderr, leave=False) if progress else None
    pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix=f"ceval-{label}")
    failure: BaseException | None = None
    try:
        futures = {pool.submit(one, i): i for i in range(n)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                scores[i], infos[i] = future.result()
            except StoppedError:
                continue
            except EndpointError as exc:
                failure = exc
                break
            if bar is not None:
                bar.update(1)
                elapsed = max(time.time() - started, 1e-6)
                bar.set_postfix_str(f"{client.attempts / elapsed:.1f} req/s, {counts['cached']} cached")
    except BaseException as exc:  # KeyboardInterrupt: stop the others, keep the cache
        failure = exc
    finally:
        if failure is not None:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    if isinstance(failure, EndpointError):
        raise EndpointError(f"{label} ({endpoint}): {failure}; {len(cache)} answer(s) kept"
                            + (f" in {cache.path}: a rerun sends only the missing requests" if cache.path else
                               " (no --out: nothing saved)")) from None
    if failure is not None:
        raise failure
    seconds = time.time() - started
    details = {"url": endpoint.url, "served_model": endpoint.model, "scoring": options.scoring,
               "prompts": "token ids" if token_ids else "text", "answers_from_cache": counts["cached"],
               "answers_fetched": counts["fetched"], "http_requests": client.attempts, "retries": client.retried,
               "concurrency": options.concurrency, "seconds": round(seconds, 2),
               "requests_per_second": round(client.attempts / seconds, 2) if seconds > 0 else None,
               "cache": str(cache.path) if cache.path else None}
    if options.scoring == "logprobs":
        details.update({
            "top_logprobs": TOP_LOGPROBS, "letter_fallback": options.letter_fallback,
            "letter_forms": list(letter_forms),
            "letter_scores_missing": sum(x.get("missing", 0) for x in infos),
            "questions_with_missing_letters": sum(bool(x.get("missing")) for x in infos),
            "questions_scored_on_spaced_letters": sum(x.get("form") == "spaced" for x in infos),
            "questions_scored_by_continuation": sum(x.get("form") == "continuation" for x in infos),
            "echo_requests": sum(x.get("echo", 0) for x in infos)})
        kind = "logprobs"
    else:
        unparsed = [i for i in range(n) if infos[i].get("unparsed")]
        details.update({
            "api": options.api, "max_tokens": options.max_tokens, "unparsed": len(unparsed),
            "budget_exhausted": sum(bool(x.get("length")) for x in infos),
            "unparsed_examples": [{"question": questions[i].key, "reply_end": (infos[i].get("text") or "")[-160:]}
                                  for i in unparsed[:5]]})
        kind = "generate"
    return ModelRun(label=label, path=str(endpoint), scores=scores, questions=list(questions), seconds=seconds,
                    scoring=kind, details=details)


def endpoint_notes(label: str, details: dict) -> list[str]:
    """Report notes for a served model's counts (letters absent from the top logprobs, unparsed replies)."""
    notes = []
    if details.get("letter_scores_missing"):
        notes.append(f"{label}: {details['letter_scores_missing']} letter score(s) in "
                     f"{details['questions_with_missing_letters']} question(s) were not among the endpoint's top "
                     f"{details['top_logprobs']} logprobs and count as -inf (--letter-fallback echo asks for them "
                     f"exactly)")
    if details.get("questions_scored_on_spaced_letters"):
        notes.append(f"{label}: {details['questions_scored_on_spaced_letters']} question(s) had no bare letter in "
                     f"the top logprobs and were scored on the letters with a leading space")
    if details.get("unparsed"):
        notes.append(f"{label}: {details['unparsed']} generated answer(s) had no parsable letter and count as wrong"
                     + (f" ({details['budget_exhausted']} reached the max_tokens budget)"
                        if details.get("budget_exhausted") else ""))
    return notes
