"""CPUs of its own for the engine process, where the node has set some aside (no torch).

Why: on a small machine the decode loop shares its cores with Serve's proxy, the ingress,
the replicas and Ray's own processes, which pass every token on in Python. Measured on
2 cores (docs/BENCHMARKS.md, issue 13): with the engine on a core that nothing else runs
on, 8 OpenAI streams got 1.28x and 1.33x the tokens a second (1.05-1.24x pinned by hand,
before this module). Raising the engine's priority instead (nice -10) changed nothing: what
it lost was the core itself, its caches and its turns, not its share. vLLM's CPU backend binds its OpenMP threads to cores for the same reason.

`make run` (backend/launch.py) sets CPUs aside: it names them in TEXTBOT_ENGINE_CPUS, which
Ray's workers and the engine processes they start inherit, and once the model runs it moves
Ray's processes and the replicas to the other CPUs (while the node starts, it has them all). Each engine process claims CPUs from the set, one per torch
thread, with a lock file per CPU, held while the process lives: a second engine (another
replica, another model) takes other CPUs or, when too few are left, runs on every CPU, those
set aside included, where the scheduler puts it: the engine that holds them may be idle (two
models on 2 cores, one asked at a time: Gemma 3 270M at 8 streams served 63 tok/s confined to
the node's core beside the idle default model's; measured in docs/BENCHMARKS.md, issue 28).
Without the variable (a cluster started by other means) nothing is pinned.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

ENV = "TEXTBOT_ENGINE_CPUS"
_held: list = []  # the claimed CPUs' lock files, open for the life of the process


def parse(text: str) -> set[int]:
    """"3", "2,3" or "2-3" -> the CPU numbers; ValueError with a sentence otherwise."""
    cpus: set[int] = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"CPUs are listed as numbers and ranges, e.g. 3 or 2,3 or 2-3; not {text!r}") from None
    if not cpus or min(cpus) < 0:
        raise ValueError(f"no CPU numbers in {text!r}: list some, e.g. 3 or 2-3")
    return cpus


def claim(count: int, reserved: set[int], lock_dir: Path | None = None) -> list[int] | None:
    """`count` CPUs of `reserved` that no other live process has claimed, now held by this
    one; None (and nothing held) when fewer are free."""
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / "textbot-engine-cpus"
    lock_dir.mkdir(parents=True, exist_ok=True)
    taken = []
    for cpu in sorted(reserved):
        if len(taken) == count:
            break
        lock = open(lock_dir / f"cpu{cpu}.lock", "w")  # noqa: SIM115 - held open while the process lives
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        taken.append((cpu, lock))
    if len(taken) < count:
        for _, lock in taken:
            lock.close()
        return None
    _held.extend(lock for _, lock in taken)
    return [cpu for cpu, _ in taken]


def pin_engine(threads: int) -> list[int] | None:
    """Run this process (every thread it has and will have) on CPUs claimed from
    TEXTBOT_ENGINE_CPUS, one per torch thread. The CPUs, or None where nothing was pinned."""
    if not (listed := os.environ.get(ENV)) or not hasattr(os, "sched_setaffinity"):
        return None
    reserved = parse(listed)
    if (cpus := claim(threads, reserved)) is None:
        _run_on(set(os.sched_getaffinity(0)) | reserved)  # shared with the other engines and the node
        return None
    return cpus if _run_on(set(cpus)) else None


def _run_on(cpus: set[int]) -> bool:
    """Every thread of this process on `cpus`; False (left where it was) if the OS refuses them."""
    try:
        for thread in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(thread), cpus)
    except OSError:  # not among this container's CPUs: run where the replica runs
        return False
    return True
