"""The generation engine, apart from the Serve deployment that hosts it.

    loading.py      finding the model, loading it (quantised or not), the converted-weights cache
    quant.py        weight-only quantised linear layers on torch's CPU kernels
    prompt.py       a conversation -> prompt tokens
    batch.py        the tensors of continuous batching: prompts read into KV caches, the decoding batch
    sampling.py     the next token from logits, per request
    detokenizer.py  token ids -> text pieces without broken characters
    engine.py       the scheduler: one decode loop per replica, submit -> Generation, cancel

Its interface is narrow: `Engine(load(settings), limits).submit(messages, sampling)`
returns a `Generation` to iterate for text pieces or to cancel.
"""

from backend.engine.engine import Engine, EngineBusyError, Generation, PromptTooLongError
from backend.engine.loading import LoadedModel, ModelLoadError, load, locate

__all__ = ["Engine", "EngineBusyError", "Generation", "LoadedModel", "ModelLoadError", "PromptTooLongError",
           "load", "locate"]
