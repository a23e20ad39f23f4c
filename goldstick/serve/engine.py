"""The serving engine: one loaded checkpoint, and a scheduler thread that batches concurrent requests.

Requests are queued; the scheduler thread takes the oldest one and, with it, every other queued request that fits
(at most ``max_batch`` prompts and ``max_batch_tokens`` padded prompt tokens together), and runs them as one
left-padded batch through ``Generator.generate_ids`` (each prompt with its own sampling parameters): the requests
that arrive while the model is busy share the next prefill and decode steps. A batch runs until its last prompt
is done. Every MindSpore call happens on that one thread.

Batching moves only the last float32 bits of a prompt's logits (the padding moves where its keys sit in the
reductions, and the products' shapes change): on a float model its log-probabilities agree to about 1e-5 alone and
in any batch, and its greedy tokens are the same (tested), as with vLLM's batching. The int8 twin's per-token
requantization turns such a last bit into a changed int8 code now and then, so there a few token log-probabilities
in a hundred move by 1e-3 or more, and a greedy choice between two near-tied tokens can change (padding alone does
the same). ``max_batch=1`` serves one request at a time, reproducibly.

The network's primitives run on the host (``host_ops.py``): nothing is kept per request or per shape.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from goldstick.errors import UsageError
from goldstick.serve import MAX_BATCH
from goldstick.serve.chat import ChatTemplate
from goldstick.serve.generate import Completion, Generator, SamplingParams
from goldstick.serve.host_ops import host_primitives

MAX_BATCH_TOKENS = 8192    # padded prompt tokens per batch (rows x width)


@dataclass
class Job:
    """One request: its token-id prompts (one choice each), their sampling parameters and the caller's future."""

    prompts: list[list[int]]
    params: SamplingParams
    future: Future = field(default_factory=Future)

    @property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)


class Engine:
    """The loaded network, tokenizer and chat template behind a scheduler thread; ``submit`` / ``complete`` may be
    called from any thread or coroutine."""

    def __init__(self, model_dir: str | Path, served_model_name: str | None = None, net=None,
                 max_batch: int = MAX_BATCH, max_batch_tokens: int = MAX_BATCH_TOKENS, host_ops: bool = True):
        if max_batch < 1 or max_batch_tokens < 1:
            raise ValueError("max_batch and max_batch_tokens must be >= 1")
        self.model_dir = Path(model_dir)
        self.model_id = served_model_name or str(model_dir)
        self.aliases = {self.model_id, str(model_dir), str(self.model_dir.resolve()), self.model_dir.resolve().name}
        self.generator = Generator.from_dir(model_dir, net=net)
        try:  # a template that does not compile fails chat requests, not the server
            self.chat_template, self.chat_template_error = ChatTemplate.from_dir(model_dir), None
        except UsageError as exc:
            self.chat_template, self.chat_template_error = None, str(exc)
        if host_ops:
            host_primitives(self.generator.net)
        self.created = int(time.time())
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.stats = {"requests": 0, "batches": 0, "prompts": 0, "largest_batch": 0}
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run_forever, name="goldstick-serve-scheduler", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    def matches(self, name: str | None) -> bool:
        return name is None or name in self.aliases or name.rstrip("/") in self.aliases

    # ---- requests ------------------------------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Future:
        """Queue one request; its future gets the list of Completions (one per prompt) or the exception."""
        job = Job([list(p) for p in prompts], params)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._queue.append(job)
            self._wake.notify()
        return job.future

    async def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        return await asyncio.wrap_future(self.submit(prompts, params))

    def close(self) -> None:
        """Stop the scheduler after the batch it is running; queued requests get an error."""
        with self._wake:
            self._closed = True
            pending, self._queue = list(self._queue), deque()
            self._wake.notify()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._thread.join(timeout=60)

    # ---- the scheduler thread ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """The oldest queued request and every later one that fits with it (FIFO: the first that does not fit
        waits for the next batch, and so do the ones after it)."""
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            rows, width = len(batch[0].prompts), batch[0].width
            while self._queue:
                job = self._queue[0]
                grown_rows, grown_width = rows + len(job.prompts), max(width, job.width)
                if grown_rows > self.max_batch or grown_rows * grown_width > self.max_batch_tokens:
                    break
                batch.append(self._queue.popleft())
                rows, width = grown_rows, grown_width
        return [job for job in batch if job.future.set_running_or_notify_cancel()]  # drop the abandoned

    def _run_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        params = [job.params for job in batch for _ in job.prompts]
        try:
            completions, _ = self.generator.generate_ids(prompts, params)
        except Exception as exc:  # handed to the request(s); the scheduler keeps serving
            if len(batch) > 1:  # one request's failure must not fail the others: each again, alone
                for job in batch:
                    self._run([job])
                return
            batch[0].future.set_exception(exc)
            return
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["prompts"] += len(prompts)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(prompts))
        start = 0
        for job in batch:
            job.future.set_result(completions[start:start + len(job.prompts)])
            start += len(job.prompts)
