"""The processes of one served stack and their memory, read from /proc (Linux).

Which processes: a stack is a tree of processes. `make run` is `python -m backend.launch`,
whose children are `ray start --block` (whose children are the GCS, the raylet and Ray's
agents; the raylet's children are the workers: Serve's controller, proxy and replicas) and
the warm engine (`python -m backend.engine.process`); an engine a replica starts is that
replica's child. So the stack is the launcher's process tree. Given only a URL, the process
listening on its port is Serve's proxy, a child of its node's raylet; walking up from it to
the launcher (`backend.launch` in its command line) finds the same tree. A node started
otherwise (`ray start` and `serve deploy`, or a driver's `ray.init()`) has no launcher: then
the stack is the tree of the raylet's parent (`ray start`, or the driver), plus every process
whose command line names the raylet's Ray session (the GCS and agents of a `ray start` that
went to the background, whose parent is then init). Other engineers' stacks on the machine are
other trees and other sessions: never counted.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    cmdline: str


def process_table() -> dict[int, Process]:
    """Every process this user can read: pid -> its parent and command line."""
    table = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name in /proc/<pid>/stat is in brackets and may hold spaces: split after it.
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            table[int(entry.name)] = Process(int(entry.name), ppid, cmdline)
    return table


def descendants(root: int, table: dict[int, Process]) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def ancestors(pid: int, table: dict[int, Process]) -> list[int]:
    """`pid`'s parent, its parent's parent, ... up to (not including) init."""
    chain = []
    # A parent we cannot read (another user's, or gone) ends the chain.
    while pid in table and (pid := table[pid].ppid) > 1 and pid in table:
        chain.append(pid)
    return chain


def listening_pid(port: int) -> int | None:
    """The process holding a listening TCP socket on `port` (any address), or None."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (PROC / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address is HEX_IP:HEX_PORT; state 0A is LISTEN.
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
    return None


def session_name(cmdline: str) -> str | None:
    """The Ray session (session_<date>_<pid>) a raylet's or GCS's command line names."""
    found = re.search(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+", cmdline)
    return found.group(0) if found else None


@dataclass(frozen=True)
class StackScope:
    """Where a stack's processes are found: below `roots`, and (a Ray node without a launcher)
    every process naming its Ray `session`, and below those. Found again at each reading,
    since replicas and their engines come and go. `how` says it in a sentence for the report."""

    roots: tuple[int, ...]
    session: str | None
    how: str

    def members(self, table: dict[int, Process]) -> set[int]:
        found = set().union(*(descendants(root, table) for root in self.roots))
        if self.session:
            for process in table.values():
                if self.session in process.cmdline:
                    found |= descendants(process.pid, table)
        return found


def scope_of_tree(pid: int) -> StackScope:
    return StackScope((pid,), None, f"the process tree of pid {pid}")


def scope_from_listener(pid: int, table: dict[int, Process]) -> StackScope:
    """The stack serving on the port `pid` listens on (see the module's docstring)."""
    chain = ancestors(pid, table)
    if launcher := next((p for p in chain if "backend.launch" in table[p].cmdline), None):
        return StackScope((launcher,), None,
                          f"the process tree of the launcher (pid {launcher}) above the port's listener")
    raylet = next((p for p in [pid, *chain] if os.path.basename(table[p].cmdline.split(" ")[0]) == "raylet"), None)
    if raylet is None:
        # Not a Ray node (llama-server, say): the listener and whatever it started.
        return StackScope((pid,), None, f"the process tree of the port's listener (pid {pid})")
    parent = table[raylet].ppid
    session = session_name(table[raylet].cmdline)
    return StackScope((parent if parent > 1 else raylet,), session,
                      f"the process tree of the raylet's parent (pid {parent}) and the processes of Ray session {session}")


# Ray names a worker after what it runs ("ray::ServeReplica:<app>:<deployment>", with ".<method>"
# while a replica runs one of its methods; "ray::ProxyActor"). While a replica starts, its actor's
# name comes first: "ray::SERVE_REPLICA::<app>#<deployment>#<id>:ServeReplica:<app>:<deployment>.__init__".
# A model's deployment is "Textbot:<model name>" (backend/settings.py, deployment_name), and a
# model's name may hold dots ("Qwen2.5-0.5B"): the method is the last ".<identifier>" before the title's end.
_REPLICA = re.compile(r"^ray::(?:SERVE_REPLICA::\S*?:)?ServeReplica:(?P<app>[^:\s]+):(?P<deployment>\S+?)"
                      r"(?:\.[A-Za-z_]\w*)?(?:\s|$)")
_MODEL_DEPLOYMENT = "Textbot:"
_SERVE_DEPLOYMENTS = {"TextbotAPI": "ingress", "ChatPage": "chat page"}
_RAY_WORKERS = {"ProxyActor": "Serve proxy", "ServeController": "Serve controller", "IDLE": "idle Ray worker"}
_PROGRAMS = {"raylet": "raylet", "gcs_server": "GCS", "llama-server": "llama-server", "backend.launch": "launcher"}


def role(process: Process, table: dict[int, Process]) -> str:
    """What a process of the stack is, in a few words (an engine or a replica with its Serve
    application: 'engine (textbot)', a model's replica with its model's name too:
    'Textbot replica SmolLM2-135M-Instruct (textbot)'). From the program alone:
    the raylet's arguments, for one, name the agents' programs it starts."""
    cmd = process.cmdline
    if replica := _REPLICA.match(cmd):
        deployment = replica["deployment"]
        if deployment.startswith(_MODEL_DEPLOYMENT):
            return f"Textbot replica {deployment.removeprefix(_MODEL_DEPLOYMENT)} ({replica['app']})"
        return f"{_SERVE_DEPLOYMENTS.get(deployment, deployment)} ({replica['app']})"
    if cmd.startswith("ray::"):
        name = cmd.removeprefix("ray::").split(" ")[0].split(".")[0]
        return _RAY_WORKERS.get(name, name)
    program = program_name(cmd)
    if program == "backend.engine.process":
        return f"engine ({engine_owner(process, table)})"
    return _PROGRAMS.get(program, program or f"pid {process.pid}")


def program_name(cmdline: str) -> str:
    """What a process runs: the executable's name, or for Python the module (`-m module`) or the
    script's name, and for Ray's command line tool its subcommand ('ray start')."""
    words = cmdline.split(" ")
    name = os.path.basename(words[0])
    if not name.startswith("python"):
        return name
    for i, word in enumerate(words[1:], 1):
        if word == "-m" and i + 1 < len(words):
            return words[i + 1]
        if word == "-c":
            return f"{name} -c"
        if not word.startswith("-"):
            script = os.path.basename(word)
            return f"ray {words[i + 1]}" if script == "ray" and i + 1 < len(words) else script
    return name


def engine_owner(engine: Process, table: dict[int, Process]) -> str:
    """The Serve application an engine process serves: its replica's (its parent); a warm
    engine, started by the launcher and adopted by a replica, is the config's first
    application's, which `make run`'s deploy.yaml names textbot."""
    parent = table.get(engine.ppid)
    if parent and (replica := _REPLICA.match(parent.cmdline)):
        return replica["app"]
    if parent and "backend.launch" in parent.cmdline:
        return "textbot"
    return "unknown"


def memory_kb(pid: int) -> dict[str, int] | None:
    """The process's resident memory (RSS, and PSS, its share of pages shared with others,
    from smaps_rollup), in KiB; None once the process has gone."""
    found = {}
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                found["rss_kb"] = int(line.split()[1])
        with contextlib.suppress(OSError):
            for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    found["pss_kb"] = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return found if "rss_kb" in found else None  # a zombie has no VmRSS
