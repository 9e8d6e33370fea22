"""The KV budget (`engine.kv_cache_mb`): one bound on all the keys and values an engine holds,
planned at admission. Requests wait while their reservation does not fit, one that could not fit
alone is refused (or shortened), and what is allocated never goes past it."""

import asyncio
import time

import pydantic
import pytest

from backend.engine import Engine
from backend.engine import loading as model
from backend.engine.kv_budget import STEP, KvBudget, Reading, token_bytes
from backend.errors import PromptTooLongError
from backend.protocol import ChatMessage, ResolvedSampling
from backend.settings import EngineSettings, ModelSettings

REPLY = ResolvedSampling(max_new_tokens=40, temperature=0.0, top_p=1.0)


def test_the_plan_counts_rows_in_powers_of_two_at_the_longest_reply_and_the_prompts_being_read():
    budget = KvBudget(limit=100 * STEP * 10, token_bytes=10, max_rows=8, tensors=4)
    assert [budget.batch_rows(n) for n in (0, 1, 2, 3, 5, 8)] == [0, 1, 2, 4, 8, 8]
    # Three replies ending at 100, 300 and 50 tokens: 4 rows of 512 (two steps), a quarter of that
    # (one of the 4 tensors reallocated), and a prompt of 20 being read.
    assert budget.plan([100, 300, 50], [Reading(1, 20)]) == (4 * 512 * 5 // 4 + 20) * 10
    # A batch keeps what it has allocated until it shrinks.
    assert budget.plan([100], [], allocated=(8, 1024)) == 8 * 1024 * 5 // 4 * 10
    # Alone, a request may reach what its row (and a reallocation) and its prompt's own KV leave.
    assert budget.longest_alone(prompt_tokens=100) == (100 * STEP - 100) * 4 // 5 // STEP * STEP
    assert budget.longest_alone(prompt_tokens=100, replies=3) < budget.longest_alone(prompt_tokens=100) // 3
    assert budget.context_tokens() <= budget.tokens // 2


def test_the_old_prefix_cache_setting_says_what_replaced_it():
    with pytest.raises(pydantic.ValidationError, match="engine.kv_cache_mb"):
        EngineSettings(prefix_cache_mb=512)


@pytest.fixture(scope="module")
def loaded(tiny_models):
    return model.load(ModelSettings(source=str(tiny_models["tiny-chat"])))


def budget_mb(loaded, tokens: int) -> float:
    return token_bytes(loaded.model.config, 4) * tokens / 2**20


def test_replies_beyond_the_budget_wait_for_room_and_all_finish(loaded):
    # Room for two rows of one step (and one of their tensors reallocated), and the prompts being
    # read beside them; not for a third row (rows go in powers of two: three would take four).
    tensors = 2 * loaded.model.config.num_hidden_layers
    two_rows = 2 * STEP + 2 * STEP // tensors + 100
    engine = Engine(loaded, EngineSettings(kv_cache_mb=budget_mb(loaded, two_rows), prefix_cache=False))
    spans: dict[int, list[float]] = {}

    async def reply(i: int):
        generation = engine.submit([ChatMessage(role="user", content=f"Tell me story number {i}.")], REPLY)
        async for _ in generation:
            spans.setdefault(i, [time.monotonic()])
        spans[i].append(time.monotonic())
        return generation

    async def six():
        return await asyncio.gather(*(reply(i) for i in range(6)))

    try:
        generations = asyncio.run(six())
        # The batch lets its keys and values go when it empties: measured once the loop has
        # retired the last reply (its end reaches us first).
        deadline = time.monotonic() + 10
        while engine.kv_usage.rows and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    assert [g.finish_reason for g in generations] == ["length"] * 6
    # Never more than two replies streaming at once: the others waited in the queue, not refused.
    instants = sorted(t for start, *_, end in spans.values() for t in (start, end))
    assert max(sum(start <= t < end for start, *_, end in spans.values()) for t in instants) == 2
    assert 0 < engine.kv_usage.peak <= engine.kv_budget.limit
    assert engine.kv_usage.rows == 0


def test_a_request_that_could_not_fit_alone_is_refused_or_shortened(loaded):
    engine = Engine(loaded, EngineSettings(kv_cache_mb=budget_mb(loaded, 3 * STEP)))
    try:
        # The context the engine reports is what one conversation can fill within the budget:
        # under half of it (its prompt is held twice while it joins the batch).
        assert 0 < engine.context_length <= 3 * STEP // 2 < loaded.context_length
        long_reply = REPLY.model_copy(update={"max_new_tokens": 2 * STEP})
        conversation = [ChatMessage(role="user", content="Hello!")]
        with pytest.raises(PromptTooLongError, match="context holds"):
            engine.submit_choices(conversation, long_reply, 1, shorten=False)
        with pytest.raises(PromptTooLongError, match="engine.kv_cache_mb"):
            engine.submit_choices(conversation, REPLY.model_copy(update={"max_new_tokens": STEP // 2}), 4,
                                  shorten=False)

        async def shortened():
            generation = engine.submit(conversation, long_reply)
            return [piece async for piece in generation], generation

        _, generation = asyncio.run(shortened())
        assert generation.prompt_tokens + generation.completion_tokens <= engine.context_length
    finally:
        engine.shutdown()


def test_a_mixed_load_never_holds_more_than_the_budget(loaded):
    """Conversations continuing from the prefix cache, long prompts read in chunks, several
    replies to one prompt, all at once, on a budget that fits a few of them."""
    engine = Engine(loaded, EngineSettings(kv_cache_mb=budget_mb(loaded, 12 * STEP), prefill_chunk=16))
    story = " ".join(f"line {i} of a long story," for i in range(15))

    async def conversation(i: int):
        history, generations = [], []
        for turn in ("Hello!", f"Tell me about {i}.", "And then?"):
            history.append(ChatMessage(role="user", content=turn))
            generation = engine.submit(history, REPLY)
            history.append(ChatMessage(role="assistant", content="".join([p async for p in generation])))
            generations.append(generation)
        return generations

    async def choices(i: int):
        generations = engine.submit_choices([ChatMessage(role="user", content=f"{story} {i}")], REPLY, 2)
        for generation in generations:
            async for _ in generation:
                pass
        return generations

    async def load():
        results = await asyncio.gather(*(conversation(i) for i in range(4)), *(choices(i) for i in range(3)))
        return [g for generations in results for g in generations]

    try:
        generations = asyncio.run(load())
    finally:
        engine.shutdown()
    assert all(g.finish_reason in ("stop", "length") for g in generations), [g.finish_reason for g in generations]
    assert sum(g.cached_tokens for g in generations) > 0  # later turns read from the prefix cache
    assert 0 < engine.kv_usage.peak <= engine.kv_budget.limit
    assert engine.prefix_cache.stats.bytes <= engine.kv_budget.limit
