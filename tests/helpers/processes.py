"""Waiting for things and cleaning up after the tests that start Ray nodes of their own."""

import contextlib
import os
import signal
import time
from pathlib import Path


def wait_for(predicate, timeout_s: float, what: str):
    """`predicate()`'s first truthy result, asked every second. An exception counts as not yet (a
    server still starting refuses connections), and the last one is told with the timeout, so a
    predicate that fails for another reason says why rather than only that time ran out."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            if result := predicate():
                return result
        except Exception as error:  # noqa: BLE001 - reported below if it never succeeds
            last_error = error
        time.sleep(1)
    raise TimeoutError(f"{what}: not within {timeout_s} s"
                       + (f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""))


def kill_processes_mentioning(text: str) -> list[str]:
    """Processes whose command line contains `text` (a Ray node's temp dir), still alive after a grace
    period, are killed (and returned, so the test can fail on them)."""
    def matching() -> dict[int, str]:
        found = {}
        for proc in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if proc.name.isdigit() and text in (cmd := (proc / "cmdline").read_text().replace("\0", " ")):
                    found[int(proc.name)] = cmd[:120]
        return found

    deadline = time.monotonic() + 20
    while (left := matching()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return list(left.values())
