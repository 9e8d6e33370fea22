"""The generation engine, apart from the Serve deployment that hosts it.

    settings.py     the settings it runs on: the model and how it loads (ModelSettings), its limits (EngineSettings)
    protocol.py     what it takes and gives: chat messages and tools, resolved sampling, log-probabilities (no torch)
    errors.py       the errors it raises (too long, invalid sampling, busy, failed); the service maps them to HTTP
    location.py     where the configured model is (no torch: the application builder checks it)
    loading.py      loading the model (quantised or not), the converted-weights cache
    modules.py      every family's weights as plain torch modules, which a converted copy loads into
    quant.py        weight-only quantised linear layers on torch's CPU kernels (and a bfloat16 output layer)
    gguf_blocks.py  a GGUF file's 4-bit weights as stored, for the int4 kernel
    prompt.py       a conversation -> prompt tokens; a long one fitted to the context
    slots.py        the engine's own transformer (every family in families/): a KV cache of rows, one forward for prompts and steps
    compiled.py     that path's decode step compiled ahead of time (AOTInductor), built once, loaded at start
    batch.py        the generic path, through Hugging Face's forward
    prefix_cache.py keys and values of finished requests, for a conversation's next turn
    kv_budget.py    one bound on all keys and values (rows and prefix cache): the plan admission follows (no torch)
    sampling.py     the next token from logits, per request
    constraint.py   structured output: a JSON schema's grammar masks the tokens that would break it
    stops.py        stop strings, cut before they reach the client
    detokenizer.py  token ids -> text pieces without broken characters
    engine.py       the scheduler: one decode loop per replica, submit -> Generation, cancel
    generation.py   a reply in flight as its consumer sees it (no torch)
    process.py      the engine in a process of its own, and the replica's side of it (no torch)
    cpus.py         CPUs set aside for the engine process, claimed one per torch thread (no torch)

Its interface is narrow: `Engine(load(settings), limits).submit(messages, sampling)`
returns a `Generation` to iterate for text pieces or to cancel. It owns the types, settings
and errors it runs on (protocol.py, settings.py, errors.py) and imports nothing of the service
around it (but compiled.py's command line, which reads deploy.yaml); the service imports them.

The names below load on first use: processes that only locate the model or catch its
errors (Serve's build step, the ingress) do not import torch.
"""

import importlib

from backend.engine.errors import EngineBusyError, PromptTooLongError

_LAZY = {"Engine": "engine", "Generation": "generation", "EngineProcess": "process", "LoadedModel": "loading", "load": "loading",
         "ModelLoadError": "location", "locate": "location"}

__all__ = ["EngineBusyError", "PromptTooLongError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
