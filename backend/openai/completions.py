"""Serving /v1/completions, the legacy text route: one reply stream per prompt (each with
`n` choices), read together; choice `i` of prompt `p` is index `p * n + i`, as OpenAI numbers them."""

from __future__ import annotations

from collections.abc import AsyncIterator

from backend.openai.protocol import Completion, CompletionChoice, CompletionRequest, LegacyLogprobs
from backend.openai.replies import Reply, UsageCounter, sse
from backend.protocol import ReplyPiece, SamplingParams, TokenLogprob, TopLogprob
from backend.streams import merge


def sampling(request: CompletionRequest) -> SamplingParams:
    return SamplingParams(max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                          seed=request.seed, n=request.n, presence_penalty=request.presence_penalty or 0.0,
                          frequency_penalty=request.frequency_penalty or 0.0, logit_bias=request.logit_bias,
                          stop=request.stop_strings or None, logprobs=request.logprobs)


class TextChoice:
    """One choice's text (after the echoed prompt, if any) and its legacy log-probabilities."""

    def __init__(self, index: int, echoed: str, top: int | None):
        self.index, self.top = index, top
        self.text = echoed
        self.logprobs = LegacyLogprobs() if top is not None else None
        self.finish_reason: str | None = None

    def push(self, piece: ReplyPiece) -> CompletionChoice:
        """Take a piece; returns the choice's chunk for it."""
        start = len(self.logprobs.tokens) if self.logprobs else 0
        if self.logprobs is not None:
            offset = len(self.text)
            for token in piece.logprobs:
                self.logprobs.tokens.append(legacy_token(token))
                self.logprobs.token_logprobs.append(token.logprob)
                self.logprobs.top_logprobs.append({legacy_token(t): t.logprob for t in token.top[:self.top]})
                self.logprobs.text_offset.append(offset)
                offset += len(token.token)
        self.text += piece.text
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
        return CompletionChoice(index=self.index, text=piece.text, logprobs=self._since(start),
                                finish_reason=self.finish_reason)

    def _since(self, start: int) -> LegacyLogprobs | None:
        if self.logprobs is None:
            return None
        lp = self.logprobs
        return LegacyLogprobs(tokens=lp.tokens[start:], token_logprobs=lp.token_logprobs[start:],
                              top_logprobs=lp.top_logprobs[start:], text_offset=lp.text_offset[start:])

    def whole(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.text, logprobs=self.logprobs,
                                finish_reason=self.finish_reason)


def legacy_token(token: TokenLogprob | TopLogprob) -> str:
    """A token as the legacy format names it: its text, or, for part of a character, its bytes
    as OpenAI writes them ("bytes:\\xe2\\x80"), so distinct tokens stay distinct keys."""
    try:
        return token.bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in token.bytes)


def _choices(request: CompletionRequest) -> list[TextChoice]:
    prompts = request.prompts
    return [TextChoice(p * request.n + i, prompts[p] if request.echo else "", request.logprobs)
            for p in range(len(prompts)) for i in range(request.n)]


async def _numbered(prompt: int, reply: Reply) -> AsyncIterator[tuple[int, ReplyPiece]]:
    async for piece in reply:
        yield prompt, piece


def _pieces(replies: list[Reply]) -> AsyncIterator[tuple[int, ReplyPiece]]:
    return merge([_numbered(p, reply) for p, reply in enumerate(replies)])


def sse_stream(request: CompletionRequest, replies: list[Reply], model: str) -> AsyncIterator[str]:
    header = Completion(model=model, choices=[]).model_dump(include={"id", "created", "model"})
    usage = UsageCounter()

    def usage_chunk() -> str:
        return Completion(**header, choices=[], usage=usage.usage()).model_dump_json()

    wanted = request.stream_options and request.stream_options.include_usage
    return sse(_chunks(request, replies, header, usage), usage_chunk if wanted else None)


async def _chunks(request: CompletionRequest, replies: list[Reply], header: dict, usage: UsageCounter
                  ) -> AsyncIterator[str]:
    choices = _choices(request)

    def chunk(choice: CompletionChoice) -> str:
        return Completion(**header, choices=[choice]).model_dump_json(exclude={"usage"})

    if request.echo:
        for choice in choices:
            yield chunk(CompletionChoice(index=choice.index, text=choice.text))
    async for prompt, piece in _pieces(replies):
        usage.count(piece, prompt)
        update = choices[prompt * request.n + piece.index].push(piece)
        if update.text or update.finish_reason or (update.logprobs and update.logprobs.tokens):
            yield chunk(update)


async def complete(request: CompletionRequest, replies: list[Reply], model: str) -> Completion:
    choices = _choices(request)
    usage = UsageCounter()
    async for prompt, piece in _pieces(replies):
        usage.count(piece, prompt)
        choices[prompt * request.n + piece.index].push(piece)
    return Completion(model=model, choices=[c.whole() for c in choices], usage=usage.usage())
