"""An OpenAI-style HTTP server for one checkpoint (float or quantized): ``goldstick serve DIR --port N``.

    POST /v1/completions   OpenAI completions: prompt (a string or a list of strings), max_tokens, temperature,
                           top_p, seed, stop, n=1, plus the common extensions top_k, repetition_penalty and
                           ignore_eos (vLLM's names); greedy when temperature is 0
    GET  /v1/models        the one served model
    GET  /health           200 once the model is loaded

Built on FastAPI + uvicorn. The model is loaded before the port opens. Requests are decoded one at a time (a lock
around the network; the cached decode loop of ``generate.Generator``), so concurrent requests queue and never mix.
A request's ``model`` must name the served model: the path as given on the command line, that path resolved,
the folder's name, or ``--served-model-name`` (an omitted ``model`` means the served one); another name gets
404. Every error is a JSON body in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status (5xx only for a failure of our own).
"""

# (no ``from __future__ import annotations``: FastAPI reads the handlers' annotations, e.g. Request, at runtime)
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from goldstick.errors import GoldstickError
from goldstick.serve.generate import Generator, SamplingParams

DEFAULT_MAX_BODY_BYTES = 1 << 20   # a larger request body gets 413
MAX_PROMPTS = 16                   # prompts per request (a list prompt is decoded as one left-padded batch)


class ServeError(GoldstickError, RuntimeError):
    """The server cannot start (its port is taken)."""


class Engine:
    """The loaded network + tokenizer behind a lock; ``complete`` is safe to call from many threads."""

    def __init__(self, model_dir: str | Path, served_model_name: str | None = None, net=None):
        self.model_dir = Path(model_dir)
        self.model_id = served_model_name or str(model_dir)
        self.aliases = {self.model_id, str(model_dir), str(self.model_dir.resolve()), self.model_dir.resolve().name}
        self.generator = Generator.from_dir(model_dir, net=net)
        self.created = int(time.time())
        self._lock = threading.Lock()

    def matches(self, name: str | None) -> bool:
        return name is None or name in self.aliases or name.rstrip("/") in self.aliases

    def complete(self, prompts: list[list[int]], params):
        with self._lock:
            return self.generator.generate_ids(prompts, params)


def create_app(engine: Engine, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    class CompletionRequest(BaseModel):
        # strict: "32" is not an integer and true is not a number; unknown OpenAI fields (user, suffix, ...) pass
        model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
        model: str | None = None
        prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        max_tokens: Annotated[int, Field(ge=0)] | None = 16
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = 1.0
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = 1.0
        top_k: Annotated[int, Field(ge=-1)] | None = -1
        repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = 1.0
        seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
        stop: str | Annotated[list[str], Field(max_length=16)] | None = None
        n: Annotated[int, Field(ge=1, le=1)] | None = 1
        stream: bool | None = False
        echo: bool | None = False
        logprobs: Annotated[int, Field(ge=0, le=0)] | None = None
        ignore_eos: bool | None = False

    def error(status: int, message: str, param: str | None = None, code: str | None = None,
              kind: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse(status_code=status,
                            content={"error": {"message": message, "type": kind, "param": param, "code": code}})

    app = FastAPI(title="goldstick", docs_url=None, redoc_url=None, openapi_url=None)

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "goldstick", "root": str(engine.model_dir)}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            return error(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return error(413, f"request body exceeds {max_body_bytes} bytes", code="body_too_large")
        try:
            req = CompletionRequest.model_validate_json(bytes(body))
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":
                return error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                             code="invalid_json")
            if first["type"] == "model_type":
                return error(400, "request body must be a JSON object")
            loc = first.get("loc") or ()
            param = str(loc[0]) if loc else None
            return error(400, f"{'.'.join(str(p) for p in loc) or 'body'}: {first['msg']}", param=param)
        if not engine.matches(req.model):
            return error(404, f"model {req.model!r} is not served here (serving {engine.model_id!r})",
                         param="model", code="model_not_found")
        if req.stream:
            return error(400, "stream=true is not supported", param="stream")
        if req.echo:
            return error(400, "echo=true is not supported", param="echo")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = SamplingParams(
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k is None else req.top_k,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=req.seed, stop=stop, ignore_eos=bool(req.ignore_eos))
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        generator = engine.generator
        # a long prompt takes a while to tokenize: off the event loop, and outside the model lock
        encoded = await anyio.to_thread.run_sync(lambda: [generator.encode(p) for p in prompts])
        try:
            params.check()
            for ids in encoded:
                generator.check_length(len(ids), params.max_tokens)
        except ValueError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            return error(400, str(exc), code=code)
        completions_, _ = await anyio.to_thread.run_sync(engine.complete, encoded, params)
        prompt_tokens = sum(len(ids) for ids in encoded)
        completion_tokens = sum(len(c.token_ids) for c in completions_)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.model_id,
            "choices": [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(completions_)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


def serve(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    """Take the port, load the model, then serve until interrupted.

    The port is bound before the model loads, so a busy port is a ``ServeError`` at once; uvicorn then serves on
    that very socket.
    """
    sock = bind_port(host, port)
    try:
        started = time.time()
        engine = Engine(model_dir, served_model_name)
        print(f"goldstick serve: {engine.model_id} loaded in {time.time() - started:.1f}s; "
              f"http://{host}:{port}/v1/completions", flush=True)
        config = uvicorn.Config(create_app(engine, max_body_bytes), log_level=log_level,
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
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

