"""Decode steps through a copy of the layers compiled ahead of time (`model.compile: true`).

A decode step of a small model is some 1200 small torch ops (norms, rotary, the KV
writes, casts around the int4 kernel); eagerly, each pays Python's and the dispatcher's
toll, a third of the step at one row. torch.export traces `slots.DecodeStep` once, with
the rows, the cache's capacity and the columns read as dynamic sizes, and AOTInductor
compiles it to a shared library (the elementwise ops fused into C++ loops, the int4 and
attention matmuls still torch's own kernels). Measured on this project's machine, the
default model, one thread: in docs/BENCHMARKS.md.

Why ahead of time, not `torch.compile` at start: compiling took 60-150 s a start here
(tracing alone 35 s, and the on-disk caches did not shorten it), while a compiled package
loads in under a second. So the first start builds it (minutes, and a C++ compiler) and
keeps it beside the converted weights (`loading.py`), named after everything that would
change it: torch's version, this CPU's instruction sets (the code is compiled for them),
and the source of the step. `python -m backend.engine.compiled deploy.yaml` builds it
ahead (`make run` and `make test` do). Without a compiler, or if building fails, the
engine runs its steps eagerly and says why in its log.

The package holds the code, not the weights (`aot_inductor.package_constants_in_so` off): at
load it is handed the model's own tensors (`load_constants(..., user_managed=True)`: pointers,
not copies). With the weights inside, the default model's package mapped its 69 MB of weights
and copied them again into 69 MB of its own, beside the model's: 137 MB of an engine process's
RSS for weights it already held. What the compiler adds itself (the int4 kernel's group size, as
a tensor) is saved beside the package (`_extra_constants`).

A row's numbers move in the last bits with the rows beside it, compiled and eager alike: attention
reads as many columns as the longest row has (the others masked), and the matmuls' sums run in
another order. Measured 2026-12-06 on the default model, a chat prompt alone and beside two
others: logits apart by up to 0.25 from the third step on (eagerly too, and before this session's
changes), so a greedy reply alone and batched may part at a near tie (there at token 19 of 24,
compiled). They differ from the eager step's in the last bits (fused float arithmetic), measured
against float32 in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# The code the compiled step is traced from: the shared transformer, its layers and its families.
_SOURCES = ("slots.py", "quant.py", *sorted(f"families/{f.name}" for f in (Path(__file__).parent / "families").glob("*.py")))
_STAGING = ".tmp.pt2"  # a package being written (the packager wants names ending in .pt2)
_BUILD = 3  # how `build` exports and compiles it: a new value when that changes (3: weights not in the package)


def package_path(folder: Path) -> Path:
    """Where the compiled step of the model converted in `folder` is kept (without importing torch)."""
    key = [str(_BUILD), importlib.metadata.version("torch"), platform.machine(), _cpu_flags()]
    key += [(Path(__file__).parent / name).read_text() for name in _SOURCES]
    digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
    return folder / f"decode-step-{digest}.pt2"


def attach(model, folder: Path) -> bool:
    """Put the compiled decode step on `model` (for `slots.decode_step`), building it first
    if `folder` has none. Whether the model now has one; failures are logged, never raised."""
    path = package_path(folder)
    try:
        if not path.is_file():
            build(model, path)
        started = time.monotonic()
        from backend.engine import slots

        slots.use_decode_step(model, _CompiledStep(str(path), slots.DecodeStep(model)))
        log.info("Decode steps run compiled (%s, loaded in %.2f s)", path.name, time.monotonic() - started)
        return True
    except Exception as exc:  # no compiler, an export that fails on this model, a broken file
        log.warning("Decode steps run eagerly: could not %s the compiled step %s (%s: %s)",
                    "load" if path.is_file() else "build", path, type(exc).__name__, str(exc)[:500])
        return False


class _CompiledStep:
    """The compiled package, called as `slots.DecodeStep` is, running on `step`'s own weights.

    Loaded with torch's own C++ loader rather than `torch._inductor.aoti_load_package`,
    whose imports (torch._inductor, torch.export, hence torch._dynamo) took 1.4-2.9 s of
    every engine process's start here; the inputs are flattened as `build` exported them."""

    def __init__(self, path: str, step):
        import torch

        self._loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)  # CPU, one runner
        from safetensors import safe_open

        own = {**dict(step.named_parameters()), **dict(step.named_buffers())}
        with safe_open(str(_extra_constants_path(Path(path))), "pt") as extra:
            added, layouts = {name: extra.get_tensor(name) for name in extra.keys()}, extra.metadata() or {}
        # The loader keeps pointers to these tensors (user_managed), so they are kept here too: the
        # model's own, which `slots` may later drop from a layer (a bfloat16 layer laid out for oneDNN).
        self._constants = {}
        for name in self._loader.get_constant_fqns():
            if name in own:
                if _layout(own[name]) != layouts.get(name):
                    raise ValueError(f"the model's {name} is laid out as {_layout(own[name])}, the step was "
                                     f"built for {layouts.get(name)}")
                self._constants[name] = own[name]
            elif name in added:
                self._constants[name] = added[name]
            else:
                raise ValueError(f"the compiled step wants a constant {name!r} that it was not given")
        self._loader.load_constants(self._constants, False, True, True)  # the active buffer, all, user-managed

    def __call__(self, hidden, positions, keys, values, visible):
        return self._loader.boxed_run([hidden, positions, *keys, *values, visible])[0]


def build(model, path: Path) -> None:
    """Export `slots.DecodeStep` with dynamic sizes and compile it into `path` (atomically:
    written beside it, then moved there, so a replica starting meanwhile never loads half a file)."""
    import torch

    from backend.engine import slots

    if not shutil.which(os.environ.get("CXX", "c++")):
        raise RuntimeError("no C++ compiler (c++ or $CXX) on PATH; install one (e.g. apt-get install g++)")
    started = time.monotonic()
    log.info("Compiling the decode step ahead of time (once for this model, torch and CPU: minutes)")
    step = slots.DecodeStep(model).eval()
    config = model.config
    kv = slots.KV(model, rows=4, capacity=64)
    hidden = torch.zeros(4, 1, config.hidden_size, dtype=kv.dtype)
    positions = torch.tensor([[10], [20], [30], [40]])
    visible = (torch.arange(41) <= positions[..., None])[:, None]
    rows = torch.export.Dim("rows", min=1, max=1 << 16)  # engine.max_running has no upper bound
    capacity = torch.export.Dim("capacity", min=2, max=1 << 20)
    length = torch.export.Dim("length", min=1, max=1 << 20)
    with torch.inference_mode():
        exported = torch.export.export(
            step, (hidden, positions, kv.keys, kv.values, visible),
            dynamic_shapes=({0: rows}, {0: rows}, [{0: rows, 3: capacity}] * len(kv.keys),
                            [{0: rows, 2: capacity}] * len(kv.values), {0: rows, 3: length}))
        staging = path.with_name(f"{path.stem}.{os.getpid()}{_STAGING}")
        try:
            with _constants_the_compiler_adds() as added, \
                    torch._inductor.config.patch({"aot_inductor.package_constants_in_so": False}):
                torch._inductor.aoti_compile_and_package(exported, package_path=str(staging))
            _save_extra_constants(staging, path, step, added)
            staging.rename(path)
        finally:
            staging.unlink(missing_ok=True)
    log.info("Compiled the decode step to %s in %.0f s", path, time.monotonic() - started)
    for stale in path.parent.glob("decode-step-*"):  # built by an older torch, CPU or source: never loaded again
        if not stale.name.startswith(f"{path.stem}.") and ".tmp" not in stale.name:  # another's build in progress
            stale.unlink(missing_ok=True)


def _extra_constants_path(package: Path) -> Path:
    """Where the constants a package wants besides the model's own tensors are kept."""
    return package.with_name(f"{package.stem}.constants.safetensors")


@contextlib.contextmanager
def _constants_the_compiler_adds():
    """{name: tensor} of the constants the compiler makes while lowering, under the names it gives
    them (the int4 kernel's group size becomes a tensor, one per matmul): not the model's, so the
    package, built without weights, would lack them; `_save_extra_constants` keeps them."""
    from torch._inductor.graph import GraphLowering

    found = {}
    original = GraphLowering.allocate_non_dup_const_name

    def recording(graph, name, data):
        found[new_name := original(graph, name, data)] = data
        return new_name
    GraphLowering.allocate_non_dup_const_name = recording
    try:
        yield found
    finally:
        GraphLowering.allocate_non_dup_const_name = original


def _layout(tensor) -> str:
    return repr((tuple(tensor.shape), tuple(tensor.stride()), str(tensor.dtype)))


def _save_extra_constants(package: Path, final: Path, step, added: dict) -> None:
    """Beside the package (named after its final place, written before it is moved there): the
    constants it wants that are not the model's tensors, and, as the file's metadata, the layout
    of those that are, checked at load (the loader takes the tensors' pointers as they come)."""
    import safetensors.torch
    import torch

    loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)
    own = {**dict(step.named_parameters()), **dict(step.named_buffers())}
    tensors, layouts = {}, {}
    for name in loader.get_constant_fqns():
        if name in own:
            layouts[name] = _layout(own[name])
        elif name in added:
            tensors[name] = added[name].detach().clone().contiguous()
        else:
            raise RuntimeError(f"the compiled step wants a constant {name!r} that neither the model nor the compiler made")
    target = _extra_constants_path(final)
    staging = target.with_name(f"{target.stem}.{os.getpid()}.tmp")
    safetensors.torch.save_file(tensors, str(staging), metadata=layouts)
    staging.rename(target)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    """`python -m backend.engine.compiled deploy.yaml`: build the compiled decode step of each of
    the config's models that asks for one (compile: true) and has none yet; quick when all have."""
    import argparse

    # The one import of the service here: this command reads its deploy.yaml (the engine never does).
    from backend.config import DeployConfig

    parser = argparse.ArgumentParser(prog="python -m backend.engine.compiled", description=main.__doc__)
    parser.add_argument("config", type=Path, help="a Serve config such as deploy.yaml")
    parser.add_argument("--which", choices=("all", "awake", "asleep"), default="all",
                        help="all models (default), those with a replica from the start, or those that sleep "
                             "until asked (make run prepares these in the background once it serves)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for _, textbot in DeployConfig.read(args.config).textbot_apps():
        for served in textbot.models:
            settings = served.model_settings()
            if not settings.compile or (args.which != "all" and served.sleeps != (args.which == "asleep")):
                continue
            from backend.engine.location import converted_cache, locate

            folder = converted_cache(settings, locate(settings))
            if folder and package_path(folder).is_file():
                continue
            from backend.engine.loading import load

            logging.info("Preparing %s: its converted copy and compiled decode step.", served.served_name)
            load(settings)  # builds it; a failure is logged, and the engine will run eagerly
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
