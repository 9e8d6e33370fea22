"""The generation engine in-process, on the tiny models: the interface the
Textbot deployment builds on (submit, iterate pieces, cancel)."""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from backend.engine import loading as model
from backend.engine.batch import PromptReader, read_whole
from backend.engine.prompt import encode_chat
from backend.engine import Engine, PromptTooLongError
from backend.protocol import ChatMessage, ResolvedSampling
from backend.settings import EngineSettings, ModelSettings

HELLO = [ChatMessage(role="user", content="Hello there!")]
GREEDY = ResolvedSampling(max_new_tokens=20, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module", params=["tiny-chat", "tiny-gpt2"])
def engine(request, tiny_models):
    return Engine(model.load(ModelSettings(source=str(tiny_models[request.param]))))


async def reply(engine, messages=HELLO, sampling=GREEDY):
    generation = engine.submit(messages, sampling)
    pieces = [piece async for piece in generation]
    return generation, pieces


def test_greedy_reply_streams_to_its_token_budget(engine):
    generation, pieces = asyncio.run(reply(engine))
    assert len(pieces) > 1
    assert generation.completion_tokens == 20
    assert generation.tokens_streamed == 20  # the pieces account for every token
    assert generation.finish_reason == "length"
    assert generation.prompt_tokens == engine.count_prompt_tokens(HELLO)
    assert engine.in_flight == 0


def test_greedy_is_deterministic_and_seeded_sampling_is_reproducible(engine):
    async def both():
        greedy = await asyncio.gather(reply(engine), reply(engine))
        sampled = ResolvedSampling(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7)
        seeded = await asyncio.gather(reply(engine, sampling=sampled), reply(engine, sampling=sampled))
        other = await reply(engine, sampling=sampled.model_copy(update={"seed": 8}))
        return greedy, seeded, other

    greedy, seeded, other = asyncio.run(both())
    assert greedy[0][1] == greedy[1][1]
    assert seeded[0][1] == seeded[1][1]
    assert "".join(other[1]) != "".join(seeded[0][1])


def test_cancel_stops_the_decode_loop(engine):
    async def cancel_midway():
        generation = engine.submit(HELLO, ResolvedSampling(max_new_tokens=400, temperature=0.0, top_p=1.0))
        stream = aiter(generation)
        await anext(stream)
        await stream.aclose()  # what a disconnect does to the consumer
        deadline = time.monotonic() + 5
        while engine.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return generation

    generation = asyncio.run(cancel_midway())
    assert engine.in_flight == 0
    assert generation.cancelled
    assert generation.completion_tokens < 400


def test_prompt_beyond_context_is_refused(engine):
    long_conversation = [ChatMessage(role="user", content="Hello there! " * 5000)]

    async def submit():
        engine.submit(long_conversation, GREEDY)

    with pytest.raises(PromptTooLongError, match="context holds"):
        asyncio.run(submit())
    assert engine.in_flight == 0


def test_models_without_chat_template_use_eos_separated_turns(tiny_models):
    loaded = model.load(ModelSettings(source=str(tiny_models["tiny-gpt2"])))
    tok = loaded.tokenizer
    conversation = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello"),
                    ChatMessage(role="user", content="How are you?")]
    ids = encode_chat(tok, conversation)
    assert tok.decode(ids) == "Hi<|endoftext|>Hello<|endoftext|>How are you?<|endoftext|>"


def test_tiny_temperatures_sample_greedily_instead_of_overflowing(engine):
    # Found by the fuzz test: logits / 1e-300 is inf, and softmax of inf is NaN.
    tiny = ResolvedSampling(max_new_tokens=20, temperature=1e-300, top_p=1.0, seed=1)
    generation, pieces = asyncio.run(reply(engine, sampling=tiny))
    assert generation.finish_reason == "length"
    assert pieces == asyncio.run(reply(engine))[1]


@pytest.mark.parametrize("top_p", [1e-300, 5e-324])
def test_tiny_top_p_keeps_the_likeliest_token(engine, top_p):
    # Found by the fuzz test: in float32 such a top_p is 0 and every token was cut.
    sampling = ResolvedSampling(max_new_tokens=20, temperature=1.0, top_p=top_p, seed=1)
    generation, pieces = asyncio.run(reply(engine, sampling=sampling))
    assert generation.finish_reason == "length"
    assert pieces == asyncio.run(reply(engine))[1]  # only the likeliest token survives: greedy


PROMPTS = ["Hello there!", "Once upon a time a small robot", "Crème brûlée, naïve café " * 4, "Hi",
           "Emoji too: 🙂 🚀 and symbols like € £ ¥, in a longer prompt " * 3]


def test_greedy_reply_is_the_same_alone_and_in_a_batch(engine):
    """Continuous batching pads prompts of different lengths into one batch and admits
    requests while others decode; none of that may change a greedy reply."""

    async def both():
        alone = [await one(prompt) for prompt in PROMPTS]
        # Staggered, so later requests join a batch that is already decoding.
        together = await asyncio.gather(*(one(prompt, delay=0.02 * i) for i, prompt in enumerate(PROMPTS)))
        # At once, so their prompts are read together, left-padded in one forward pass.
        at_once = await asyncio.gather(*(one(prompt) for prompt in PROMPTS))
        return alone, together, at_once

    async def one(prompt, delay=0.0):
        await asyncio.sleep(delay)
        generation, pieces = await reply(engine, [ChatMessage(role="user", content=prompt)])
        return "".join(pieces), generation.completion_tokens

    alone, together, at_once = asyncio.run(both())
    assert together == alone
    assert at_once == alone
    assert all(tokens > 0 for _, tokens in alone)
    assert engine.in_flight == 0 and engine.running == 0


def test_batch_admits_and_retires_requests_between_steps(engine):
    """A short request that joins a long one finishes first, while the long one decodes on."""

    async def race():
        long = engine.submit(HELLO, ResolvedSampling(max_new_tokens=200, temperature=0.0, top_p=1.0))
        stream = aiter(long)
        await anext(stream)  # the long reply is decoding
        short, _ = await reply(engine, sampling=ResolvedSampling(max_new_tokens=5, temperature=0.0, top_p=1.0))
        running_after_short = engine.running
        rest = [piece async for piece in stream]
        return long, short, running_after_short, rest

    long, short, running_after_short, rest = asyncio.run(race())
    assert short.completion_tokens == 5 and short.finish_reason == "length"
    assert running_after_short == 1  # the short one retired at once; the long one still running
    assert long.completion_tokens == 200 and rest
    assert engine.in_flight == 0


def test_health_problem_reports_a_dead_decode_loop(tiny_models):
    engine = Engine(model.load(ModelSettings(source=str(tiny_models["tiny-chat"]))))
    assert engine.problem() is None
    asyncio.run(reply(engine))  # a reply goes through: still healthy, not stalled
    assert engine.problem() is None
    engine.shutdown()  # the loop ends, as it would if it died
    deadline = time.monotonic() + 5
    while engine.problem() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.problem() == "The decode loop is not running."



def test_prompts_read_in_chunks_give_the_same_greedy_replies(engine, tiny_models):
    """A prompt read a few tokens per step (here 5) continues from its own KV cache: the
    replies are those of prompts read whole."""
    chunked = Engine(engine.loaded, EngineSettings(prefill_chunk=5))

    async def replies(of):
        return [("".join((await reply(of, [ChatMessage(role="user", content=p)]))[1])) for p in PROMPTS]

    try:
        assert asyncio.run(replies(chunked)) == asyncio.run(replies(engine))
    finally:
        chunked.shutdown()


def test_the_batch_decodes_on_while_a_long_prompt_is_read(tiny_models):
    """One chunk of a long prompt per step, then a decode step for the batch: the reply
    already streaming gets a token for every chunk, instead of waiting for the whole prompt."""
    chunk = 16
    engine = Engine(model.load(ModelSettings(source=str(tiny_models["tiny-chat"]))),
                    EngineSettings(prefill_chunk=chunk))
    long_prompt = [ChatMessage(role="user", content="Once upon a time a small robot learned. " * 150)]
    one_token = ResolvedSampling(max_new_tokens=1, temperature=0.0, top_p=1.0)

    async def race():
        streaming = engine.submit(HELLO, ResolvedSampling(max_new_tokens=2000, temperature=0.0, top_p=1.0))
        stream = aiter(streaming)
        await anext(stream)
        before = streaming.completion_tokens
        late = engine.submit(long_prompt, one_token)
        [piece async for piece in late]
        during = streaming.completion_tokens - before
        await stream.aclose()
        return late, during

    try:
        late, during = asyncio.run(race())
    finally:
        engine.shutdown()
    steps = -(-late.prompt_tokens // chunk)
    assert late.prompt_tokens > 1000 and late.completion_tokens == 1
    assert during >= steps - 1, (during, steps)


def test_health_problem_reports_a_wedged_decode_loop(tiny_models):
    """A forward pass that does not return (held here by a hook on the real model) is a
    wedged loop once it lasts `max_stall_seconds` with a request in flight."""
    engine = Engine(model.load(ModelSettings(source=str(tiny_models["tiny-chat"]))),
                    EngineSettings(max_stall_seconds=0.2))
    release = threading.Event()

    def hold(module, args) -> None:  # returns None: the forward pass gets its arguments unchanged
        release.wait(30)

    hook = engine.loaded.model.get_input_embeddings().register_forward_pre_hook(hold)  # every forward path

    async def wedge_then_release():
        generation = engine.submit(HELLO, GREEDY)
        deadline, problem = time.monotonic() + 10, None
        while problem is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            problem = engine.problem()
        release.set()
        pieces = [piece async for piece in generation]
        return problem, generation, pieces

    try:
        time.sleep(0.3)
        assert engine.problem() is None  # idle for longer than the limit is not a stall
        problem, generation, pieces = asyncio.run(wedge_then_release())
    finally:
        release.set()
        hook.remove()
        engine.shutdown()
    assert problem is not None and problem.startswith("The decode loop has finished no step for"), problem
    assert generation.completion_tokens == 20 and pieces  # once the step returns, the reply goes on
    assert engine.problem() in (None, "The decode loop is not running.")


def test_prompts_read_together_give_each_the_logits_of_reading_it_alone(engine):
    """Several prompts in one left-padded forward pass (what the loop does with short prompts
    that arrive together): each row's next-token logits are those of its prompt read alone."""
    requests = [SimpleNamespace(prompt_ids=engine.loaded.tokenizer.encode(p)) for p in PROMPTS]
    with torch.inference_mode():
        together = read_whole(engine.loaded.model, [PromptReader(engine.loaded.model, r) for r in requests])
        for request, logits in zip(requests, together.logits):
            alone = PromptReader(engine.loaded.model, request)
            alone.read(len(request.prompt_ids))
            assert torch.allclose(logits, alone.logits, atol=1e-4), (request.prompt_ids, (logits - alone.logits).abs().max())
    assert together.mask.sum(1).tolist() == [len(r.prompt_ids) for r in requests]


def test_logit_bias_and_penalties_apply_before_choosing():
    from backend.engine.sampling import adjust, sample

    logits = torch.tensor([1.0, 0.9, 0.0])
    greedy = ResolvedSampling(max_new_tokens=1, temperature=0.0, top_p=1.0)
    rng = torch.Generator()

    def choose(update: dict, generated=()) -> int:
        sampling = greedy.model_copy(update=update)
        return sample(adjust(logits, sampling, list(generated)), sampling, rng)

    assert choose({}) == 0
    assert choose({"logit_bias": {2: 5.0}}) == 2
    # Token 0 was used twice: a frequency penalty of 0.1 costs it 0.2, a presence penalty 0.2 once.
    assert choose({"frequency_penalty": 0.1}, [0, 0]) == 1
    assert choose({"frequency_penalty": 0.04}, [0, 0]) == 0
    assert choose({"presence_penalty": 0.2}, [0, 0]) == 1
    assert choose({"presence_penalty": -1.0}, [1]) == 1
    assert torch.equal(logits, torch.tensor([1.0, 0.9, 0.0]))  # the row itself is left alone
