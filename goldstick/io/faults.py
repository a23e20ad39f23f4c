"""Test hook for crash tests: stall in the middle of writing a file, so that a test can kill the process there.

    GOLDSTICK_TEST_STALL="*-00002.safetensors.partial"   glob matched against the name of the file being written
    GOLDSTICK_TEST_STALL_MARKER=/tmp/x/stalled            created once the stall begins (the test polls for it)

When both are set, ``stall(path)`` (called by ``writer.write_safetensors`` after the header and half of the data
are on disk) creates the marker and sleeps, leaving a half-written file behind for the kill to find. Unset (always,
outside tests), it is a dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path

STALL_SECONDS = 600  # long enough for any test to notice and kill; bounded in case nobody does


def stall(path: str | Path) -> None:
    pattern = os.environ.get("GOLDSTICK_TEST_STALL")
    marker = os.environ.get("GOLDSTICK_TEST_STALL_MARKER")
    if not pattern or not marker or not fnmatch.fnmatch(Path(path).name, pattern):
        return
    Path(marker).write_text(f"{os.getpid()} {path}\n")
    time.sleep(STALL_SECONDS)
