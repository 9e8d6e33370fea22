"""Finding and loading the causal LM."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from backend.engine import modules, slots
from backend.engine.location import ModelLoadError, ModelLocation, converted_cache, locate
from backend.engine.quant import Q8_EMBEDDING, Q8Embedding, quantize_model, tie_to_q8_embedding, use_q8_embedding
from backend.engine.settings import ModelSettings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    context_length: int
    eos_token_ids: frozenset[int]
    compiled: bool = False  # decode steps through the ahead-of-time compiled copy (compiled.py)
    # Why the engine's own transformer (slots.py) does not run it, so transformers' forward does; None when it does.
    fallback: str | None = None


def load(settings: ModelSettings, transformers_model: bool = False) -> LoadedModel:
    """The model as the engine runs it: quantised as `model.quantization` says. A GGUF model's
    converted form is cached on disk, so only its first start pays for the conversion, and
    the copy of a model of a family the engine runs loads into the engine's own modules
    (`modules.py`: no import of transformers' modelling code). `transformers_model`: a transformers model object
    instead (for `generate`, as the benchmark's baseline calls it)."""
    location = locate(settings)
    started = time.monotonic()
    cache = converted_cache(settings, location)
    try:
        if cache and (cache / _COMPLETE).is_file():
            log.info("Loading model %s from its converted copy in %s", settings.served_name, cache)
            tokenizer, model = _load_converted(cache, settings, transformers_model)
        else:
            log.info("Loading model %s from %s%s", settings.served_name, location,
                     " (converting a GGUF file takes a while; later starts use a cache)" if cache else "")
            tokenizer, model = _load_source(location, settings)
            if (cache and _save_converted(model, tokenizer, cache) and not transformers_model
                    and modules.supports(modules.read_config(cache))):
                # Run the engine's own modules, as later starts will, from the first start on
                # (other architectures load as transformers' model either way: kept as it is).
                del model
                tokenizer, model = _load_converted(cache, settings)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load model {settings.source!r}: {exc}") from exc
    log.info("Loaded %s (%s weights, %s activations) in %.1f s", settings.served_name,
             settings.quantization, settings.dtype, time.monotonic() - started)
    if isinstance(head := model.get_output_embeddings(), torch.nn.Linear):  # not quantised
        model.set_output_embeddings(VocabProjection(head))
    fallback = None if transformers_model else slots.why_not(model)
    return LoadedModel(
        name=settings.served_name,
        model=model,
        tokenizer=tokenizer,
        context_length=_context_length(model.config),
        eos_token_ids=_eos_token_ids(model, tokenizer),
        compiled=settings.compile and not transformers_model and _compile(model, settings, cache, fallback),
        fallback=fallback,
    )


def _compile(model, settings: ModelSettings, cache: Path | None, fallback: str | None) -> bool:
    from backend.engine import compiled

    if fallback:
        log.warning("model.compile: %s runs through transformers' forward, not the engine's own, because %s; "
                    "it runs eagerly", settings.served_name, fallback)
        return False
    if not (cache and (cache / _COMPLETE).is_file()):
        log.warning("model.compile: the compiled step is kept with the converted weights, which %s does not "
                    "have (a GGUF source, and model.cache_dir set); it runs eagerly", settings.served_name)
        return False
    return compiled.attach(model, cache)


def _load_source(location: ModelLocation, settings: ModelSettings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backend.engine.gguf_blocks import q8_0_embedding, stored_weights

    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(location.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location.path, dtype=getattr(torch, settings.dtype), **kwargs)
    stored, embedding = None, None
    if location.gguf_file and settings.quantization == "int4":
        gguf_path = str(Path(location.path, location.gguf_file))
        stored, embedding = stored_weights(gguf_path, model), q8_0_embedding(gguf_path, model)
    quantize_model(model, settings.quantization, stored, prompt_copies=_prompt_copies(model, settings))
    if embedding is not None:
        use_q8_embedding(model, embedding)
    return tokenizer, model.eval()


def _prompt_copies(model, settings: ModelSettings) -> bool:
    """Whether int4 layers keep bfloat16 copies of their weights for prompts (`model.prompt_weights`):
    only the engine's own transformer reads prompts through them."""
    return settings.prompt_weights == "bfloat16" and slots.supports(model)


def _load_converted(cache: Path, settings: ModelSettings, transformers_model: bool = False):
    """The cached model as it was saved: quantised layers are built empty and take the saved
    tensors as they are (no conversion, no random initialisation of weights to overwrite)."""
    tokenizer = _load_tokenizer(cache)
    dtype = getattr(torch, settings.dtype)
    if modules.supports(config := modules.read_config(cache)) and not transformers_model:
        with safetensors.safe_open(cache / _WEIGHTS, "pt") as saved:
            model = modules.empty_model(cache, config, dtype, list(saved.keys()))
    else:
        import accelerate
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        with accelerate.init_empty_weights(include_buffers=False):  # buffers such as rotary tables stay real
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cache), dtype=dtype)
        model.generation_config = GenerationConfig.from_pretrained(cache)
    quantize_model(model, settings.quantization, empty=True, prompt_copies=_prompt_copies(model, settings))
    if getattr(model.config, Q8_EMBEDDING, False):
        use_q8_embedding(model, Q8Embedding.of(model.get_input_embeddings()), empty=True)
    # Each tensor read into memory of its own (pread), not views of one mapping of the whole file:
    # a tensor the engine replaces (the layers `quant.fuse` joins) is then freed, while one view
    # kept the whole mapping, every page of it read, in the process (the default model: 41 MB).
    state = safetensors.torch.load_file(cache / _WEIGHTS, backend="pread")
    # An unquantised output layer tied to the embedding shares its tensor, saved once.
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(head, torch.nn.Linear):
        module_names = {module: name for name, module in model.named_modules()}
        tied = [f"{module_names[m]}.weight" for m in (model.get_input_embeddings(), head)]
        if saved := next((name for name in tied if name in state), None):
            state |= {name: state[saved] for name in tied}
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"the converted copy in {cache} does not fit the model; delete that folder ({exc})") from exc
    tie_to_q8_embedding(model)
    return tokenizer, model.eval()


# tokenizer_config.json keys that say how the file was written, not how the tokenizer behaves.
_TOKENIZER_FILE_KEYS = {"tokenizer_class", "backend", "is_local", "local_files_only", "auto_map", "added_tokens_decoder"}


def _load_tokenizer(folder: Path):
    """The tokenizer we saved with a converted copy: its tokenizer.json, read once, as a fast
    tokenizer with tokenizer_config.json's settings. Not through AutoTokenizer or from_pretrained:
    for Gemma's 33 MB tokenizer.json they cost 4.8 s of a sleeping model's wake, where reading
    the file costs 1.2 s. They import the family's tokenizer class and parse the file four
    more times in Python's json (2.0 s), and a class such as GemmaTokenizer converts it
    again (1.7 s). The saved tokenizer.json already holds what those classes add (their
    normaliser, pre-tokeniser and BOS post-processor), so the ids are the same
    (tests/test_tokenizer_loading.py)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("backend", "tokenizers") != "tokenizers" or not tokenizer_file.is_file():
        return AutoTokenizer.from_pretrained(folder)
    settings = {key: value for key, value in config.items() if key not in _TOKENIZER_FILE_KEYS}
    if (template := folder / "chat_template.jinja").is_file():
        settings["chat_template"] = template.read_text()
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), name_or_path=str(folder), **settings)


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
_WEIGHTS = "model.safetensors"


def _save_converted(model, tokenizer, cache: Path) -> bool:
    """Write the converted model next to its final place, then move it there in one step,
    so a replica that starts meanwhile never reads half a cache. Whether it is there now."""
    started = time.monotonic()
    staging = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        # save_pretrained refuses a GGUF-loaded model; safetensors' save_model handles tied weights.
        safetensors.torch.save_model(model, str(staging / _WEIGHTS))
        (staging / _COMPLETE).touch()
        staging.rename(cache)
        log.info("Saved the converted model to %s in %.1f s; later starts load it from there",
                 cache, time.monotonic() - started)
    except OSError as exc:  # another replica got there first, or the disk is read-only: serve anyway
        log.warning("Could not cache the converted model in %s (%s)", cache, exc)
        shutil.rmtree(staging, ignore_errors=True)
    return (cache / _COMPLETE).is_file()


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
