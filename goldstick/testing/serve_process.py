"""``goldstick serve`` in a subprocess on a loopback port, for tests and benchmarks: started, waited for until
``/health`` answers, and always ended (``stop`` terminates it, ``kill`` sends SIGKILL as a crash would)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServeProcess:
    """``goldstick serve MODEL --port PORT ARGS...``, its output appended to ``log_path``; a ``RuntimeError`` with the
    log when it exits or is not healthy within ``startup`` seconds. Usable as a context manager (``stop`` on exit)."""

    def __init__(self, model: str | Path, log_path: str | Path, port: int | None = None, host: str = HOST,
                 args: tuple[str, ...] = (), startup: float = 300):
        self.model, self.host, self.port = model, host, port or free_port(host)
        self.log_path = Path(log_path)
        self.base = f"http://{host}:{self.port}"
        self.url = f"{self.base}/v1"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "goldstick.cli", "serve", str(model), "--host", host,
                                          "--port", str(self.port), "--log-level", "warning", *args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + startup
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"goldstick serve {model} exited with {self.proc.returncode}:\n{self.log()}")
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"goldstick serve {model} not healthy after {startup}s:\n{self.log()}")
            time.sleep(0.1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
