"""An OpenAI-style HTTP server for one checkpoint (float or quantized): ``goldstick serve DIR --port N``.

    POST /v1/completions       OpenAI completions: prompt (a string, a list of strings, a list of token ids or a
                               list of lists of token ids), max_tokens (0 with echo: score the prompt only),
                               temperature, top_p, seed, stop, n=1, echo, logprobs (0..20), plus the common
                               extensions top_k, repetition_penalty and ignore_eos (vLLM's names); greedy when
                               temperature is 0
    POST /v1/chat/completions  OpenAI chat: messages rendered with the model's chat template (400 when it has none);
                               max_tokens / max_completion_tokens (default: the rest of the context), logprobs,
                               top_logprobs and the sampling fields above
    GET  /v1/models            the one served model (with ``max_model_len``, as vLLM lists it)
    GET  /health               200 once the model is loaded
    GET  /stats                requests, batches and prompts served, the largest batch, the queue's length

Built on FastAPI + uvicorn; the shapes are in ``openai_api.py``. The model is loaded before the port opens.
Requests go to the engine's scheduler thread (``engine.py``), which runs the ones that arrive while the model is
busy together, as one left-padded batch; tokenizing and templating happen off the event loop. A request's ``model``
must name the served model: the path as given on the command line, that path resolved, the folder's name, or
``--served-model-name`` (an omitted ``model`` means the served one); another name gets 404. Every error is a JSON
body in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status (5xx only for a
failure of our own).
"""

# (no ``from __future__ import annotations``: FastAPI reads the handlers' annotations, e.g. Request, at runtime)
import socket
import time
from pathlib import Path

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from goldstick.errors import GoldstickError
from goldstick.serve import MAX_BATCH
from goldstick.serve.engine import Engine
from goldstick.serve.openai_api import (
    ChatRequest,
    CompletionRequest,
    chat_response,
    completion_choice,
    completion_response,
    logprobs_error,
)

DEFAULT_MAX_BODY_BYTES = 1 << 20   # a larger request body gets 413


class ServeError(GoldstickError, RuntimeError):
    """The server cannot start (its port is taken)."""


class RequestError(Exception):
    """A request refused with a 4xx JSON error (raised inside a handler, answered by the app)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
        raise RequestError(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise RequestError(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
    return bytes(body)


def parse(model_class, body: bytes):
    """The validated request, or a RequestError naming the first problem."""
    try:
        return model_class.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise RequestError(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                               code="invalid_json") from None
        if first["type"] == "model_type":
            raise RequestError(400, "request body must be a JSON object") from None
        loc = first.get("loc") or ()
        param = str(loc[0]) if loc else None
        raise RequestError(400, f"{'.'.join(str(p) for p in loc) or 'body'}: {first['msg']}", param=param) from None


def create_app(engine: Engine, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    generator = engine.generator
    app = FastAPI(title="goldstick", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request, exc):
        return error(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown route, wrong method
        return error(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(400, str(exc.errors()[:1]))

    @app.exception_handler(Exception)
    async def internal_error(request, exc):  # a bug of ours: report it as JSON, keep serving
        return error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {**engine.stats, "queued": engine.queued, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "goldstick", "root": str(engine.model_dir),
                                            "max_model_len": generator.max_positions}]}

    def check_request(req) -> None:
        if not engine.matches(req.model):
            raise RequestError(404, f"model {req.model!r} is not served here (serving {engine.model_id!r})",
                               param="model", code="model_not_found")
        if req.stream:
            raise RequestError(400, "stream=true is not supported", param="stream")

    def check_params(params, prompts: list[list[int]]) -> None:
        try:
            params.check()
            for ids in prompts:
                generator.check_length(len(ids), params.max_tokens)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise RequestError(400, str(exc), code=code) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request, max_body_bytes))
        check_request(req)
        refused = logprobs_error(req.logprobs)
        if refused:
            raise RequestError(400, refused, param="logprobs")
        texts, token_prompts = req.prompts()
        for ids in token_prompts:
            bad = next((t for t in ids if not 0 <= t < generator.vocab_size), None)
            if bad is not None:
                raise RequestError(400, f"prompt token id {bad} is outside the vocabulary [0, "
                                        f"{generator.vocab_size})", param="prompt")
        # a long prompt takes a while to tokenize: off the event loop
        encoded = token_prompts or await anyio.to_thread.run_sync(lambda: [generator.encode(p) for p in texts])
        echo = bool(req.echo)
        params = req.sampling(16 if req.max_tokens is None else req.max_tokens, req.logprobs,
                              req.logprobs if echo else None)
        check_params(params, encoded)
        done = await engine.complete(encoded, params)
        if echo and not texts:
            texts = await anyio.to_thread.run_sync(lambda: [generator.decode(ids) for ids in encoded])
        with_logprobs = req.logprobs is not None

        def choices():
            return [completion_choice(generator, i, c, texts[i] if echo else "", echo, with_logprobs)
                    for i, c in enumerate(done)]
        return completion_response(engine.model_id, await anyio.to_thread.run_sync(choices), done)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_body(request, max_body_bytes))
        check_request(req)
        refused = logprobs_error(req.top_logprobs)
        if req.top_logprobs is not None and not req.logprobs:
            refused = "top_logprobs needs logprobs: true"
        if refused:
            raise RequestError(400, refused, param="top_logprobs")
        template = engine.chat_template
        if template is None:
            raise RequestError(400, engine.chat_template_error or
                               f"model {engine.model_id!r} has no chat template (no chat_template in its "
                               "tokenizer_config.json): use /v1/completions", code="no_chat_template")
        messages = [m.for_template() for m in req.messages]

        def tokenize():
            text = template.render(messages)
            return generator.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
        try:
            ids = await anyio.to_thread.run_sync(tokenize)
        except ValueError as exc:
            raise RequestError(400, str(exc), param="messages") from None
        if not ids:
            raise RequestError(400, "the chat template rendered these messages as no tokens", param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(generator.max_positions - len(ids), 0)
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        check_params(params, [ids])
        (done,) = await engine.complete([ids], params)
        return await anyio.to_thread.run_sync(
            lambda: chat_response(engine.model_id, done, bool(req.logprobs), generator))

    return app


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info", max_batch: int = MAX_BATCH) -> None:
    """Take the port, load the model, then serve until interrupted.

    The port is bound before the model loads, so a busy port is a ``ServeError`` at once; uvicorn then serves on
    that very socket. ``max_batch`` bounds the prompts run together (1: one request at a time).
    """
    sock = bind_port(host, port)
    try:
        started = time.time()
        engine = Engine(model_dir, served_model_name, max_batch=max_batch)
        try:
            print(f"goldstick serve: {engine.model_id} loaded in {time.time() - started:.1f}s; "
                  f"http://{host}:{port}/v1/completions", flush=True)
            config = uvicorn.Config(create_app(engine, max_body_bytes), log_level=log_level,
                                    timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()


def bind_port(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``, or a ``ServeError`` naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                         "(is another server using it? choose another --port)") from None
    sock.set_inheritable(True)
    return sock
