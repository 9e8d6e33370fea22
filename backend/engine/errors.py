"""The errors the engine raises. The service's backend/errors.py imports these same classes
and maps them to HTTP responses (status codes, error shapes)."""


class PromptTooLongError(ValueError):
    """The engine's: the prompt leaves no room in the model's context for a reply."""


class InvalidSamplingError(ValueError):
    """The engine's: a parameter the model cannot take (a token id beyond its vocabulary, a schema
    its grammar cannot enforce); `param` names it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineBusyError(RuntimeError):
    """The engine's: every generation slot and waiting place is taken; try again shortly."""


class GenerationError(RuntimeError):
    """The model failed while generating, or its replica was lost: the stream ends with this error."""
