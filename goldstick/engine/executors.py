"""Where independent work units run: in this process, in local worker processes, or on a Ray cluster.

    with get_executor("local", workers=4) as ex:           # "inline" | "threads" | "local" | "ray" | an Executor
        for result in ex.imap_unordered(fn, units):        # at most max_in_flight units submitted at a time
            ...
        results = ex.map(fn, units)                        # the same, results in the order of ``units``

A unit is a small picklable description of its work (which tensor rows to read, where to write them) and ``fn``
a module-level function, so the same unit gives the same bytes wherever it runs: the streaming path's units write
their own output bytes into the planned shard files (goldstick.engine.stream), the layer path's units return a quantized
weight (goldstick.engine.pipeline). ``max_in_flight`` bounds memory: a handful of units, not a shard, are ever pending.

* ``InlineExecutor`` runs units one by one in the calling process (tests, tiny models, debugging).
* ``LocalExecutor`` is a ``concurrent.futures`` process pool, started with ``spawn`` so that workers import only
  numpy and goldstick's numpy modules (not MindSpore, ~430 MB each, and no fork of a threaded process).
* ``ThreadExecutor`` is the same loop on a thread pool in this process: for units whose work releases the GIL
  (the streaming path's: pread/pwrite, numba ``nogil`` kernels, numpy), it saves each worker's start-up (spawn,
  imports, numba's cache load) and the pickling of results.
* ``RayExecutor`` submits units as Ray tasks (``pip install goldstick[ray]``; ray is imported only here). On one
  machine it starts a local Ray instance; with ``address`` it joins a cluster (``ray start --head`` on one node,
  ``ray start --address=HEAD:6379`` on the others). Units read the source and write the output by path, so on a
  multi-machine cluster both must be on a filesystem every node mounts at the same path (as NFS/Lustre model
  stores are); the driver fsyncs, renames and writes the index.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait

EXECUTORS = ("inline", "threads", "local", "ray")


class ExecutorError(RuntimeError):
    pass


class Executor:
    """Runs ``fn(unit)`` for independent units; subclasses implement ``imap_unordered``."""

    name = "executor"
    workers = 1
    min_params = 0  # callers may keep work smaller than this (in parameters) in their own process

    def imap_unordered(self, fn: Callable, units: Iterable, max_in_flight: int | None = None) -> Iterator:
        raise NotImplementedError

    def map(self, fn: Callable, units: Iterable, max_in_flight: int | None = None) -> list:
        """Results in the order of ``units``."""
        indexed = list(enumerate(units))
        results: list = [None] * len(indexed)
        for k, value in self.imap_unordered(_Indexed(fn), indexed, max_in_flight):
            results[k] = value
        return results

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"{self.name} ({self.workers} worker{'s' if self.workers != 1 else ''})"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Indexed:
    """fn applied to the unit of an (index, unit) pair, keeping the index (picklable, unlike a closure)."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, pair):
        index, unit = pair
        return index, self.fn(unit)


class InlineExecutor(Executor):
    name = "inline"

    def imap_unordered(self, fn, units, max_in_flight=None):
        for unit in units:
            yield fn(unit)


def exit_with_parent(parent: int) -> None:
    """A local worker's watch on the process that started it: a driver killed without closing its pool (SIGTERM
    from a scheduler, SIGKILL, the OOM killer) leaves no worker behind, holding memory, once it is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class LocalExecutor(Executor):
    """A pool of ``workers`` local processes (default: every core); started on first use, kept until close()."""

    name = "local"

    def __init__(self, workers: int | None = None, start_method: str = "spawn"):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.start_method = start_method
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                             mp_context=multiprocessing.get_context(self.start_method),
                                             initializer=exit_with_parent, initargs=(os.getpid(),))
        return self._pool

    def imap_unordered(self, fn, units, max_in_flight=None):
        pool = self._get_pool()
        limit = max(1, max_in_flight or 2 * self.workers)
        pending = set()
        units = iter(units)
        try:
            while True:
                while len(pending) < limit:
                    unit = next(units, _END)
                    if unit is _END:
                        break
                    pending.add(pool.submit(fn, unit))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class ThreadExecutor(LocalExecutor):
    """``workers`` threads of this process (default: every core), for units that release the GIL."""

    name = "threads"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)

    def _get_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="goldstick-unit")
        return self._pool


class RayExecutor(Executor):
    """Units as Ray tasks (one CPU each). Joins ``address`` (or RAY_ADDRESS) if given, else starts a local Ray
    with ``num_cpus``; shuts Ray down on close() only if it started it."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise ExecutorError("the ray executor needs the 'ray' package: pip install 'goldstick[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False}
            if address or os.environ.get("RAY_ADDRESS"):
                kwargs["address"] = address or os.environ["RAY_ADDRESS"]
            else:
                kwargs["num_cpus"] = num_cpus or os.cpu_count()
            ray.init(**kwargs)
            self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, int(workers or cpus))
        self._call = ray.remote(num_cpus=1, max_retries=0)(_call)
        self._actors: dict[type, list] = {}

    def actors(self, cls: type) -> list:
        """``workers`` Ray actors of ``cls`` (e.g. goldstick.engine.statistics.StatisticsActor), made on first use
        and kept until close(). They reserve no CPU: they work in phases when no task runs (the layer path's
        statistics pass), and Ray tasks would otherwise wait for the CPUs they hold."""
        if cls not in self._actors:
            remote = self._ray.remote(num_cpus=0)(cls)
            self._actors[cls] = [remote.remote() for _ in range(self.workers)]
        return self._actors[cls]

    def imap_unordered(self, fn, units, max_in_flight=None):
        ray = self._ray
        limit = max(1, max_in_flight or 2 * self.workers)
        pending: list = []
        units = iter(units)
        try:
            while True:
                while len(pending) < limit:
                    unit = next(units, _END)
                    if unit is _END:
                        break
                    pending.append(self._call.remote(fn, unit))
                if not pending:
                    return
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        for actors in self._actors.values():
            for actor in actors:
                self._ray.kill(actor)
        self._actors.clear()
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


_END = object()


def _call(fn: Callable, unit):
    """The one Ray task: fn(unit) (fn travels by reference when it is a module-level function)."""
    return fn(unit)


def get_executor(spec: str | Executor | None = None, workers: int | None = None,
                 ray_address: str | None = None) -> Executor:
    """An Executor from a name (``inline``, ``local``, ``ray``), or ``spec`` itself if it is one; None = local."""
    if isinstance(spec, Executor):
        return spec
    kind = spec or "local"
    if kind == "inline":
        return InlineExecutor()
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "threads":
        return ThreadExecutor(workers)
    if kind == "ray":
        return RayExecutor(address=ray_address, workers=workers)
    raise ExecutorError(f"unknown executor {spec!r}; choose one of {', '.join(EXECUTORS)}")
