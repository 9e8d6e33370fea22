"""The prefix cache: a conversation's next turn reads only its new tokens, and replies
are what they would be without it (greedy alike, seeded sampling alike)."""

import asyncio

import pytest
import torch

from backend.engine import Engine
from backend.engine import loading as model
from backend.engine.kv_budget import STEP, token_bytes
from backend.engine.prefix_cache import PrefixCache
from backend.protocol import ChatMessage, ResolvedSampling
from backend.settings import EngineSettings, ModelSettings
from tests import tiny_models as builders

GREEDY = ResolvedSampling(max_new_tokens=12, temperature=0.0, top_p=1.0)
SEEDED = ResolvedSampling(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
TURNS = ["Hello there!", "How are you today?", "Tell me a story.", "Once upon a time?", "Thank you."]
# A chat template that rewrites the conversation's start every turn (it counts the messages):
# the cached prefix of the previous turn matches only up to that count.
COUNTING = "<|im_start|>system\n{{ messages|length }} messages<|im_end|>\n" + builders.CHATML


@pytest.fixture(scope="module", params=["tiny-chat", "plain-llama", "qwen2", "qwen3", "gemma3", "mistral"])
def loaded(request, tiny_models, tmp_path_factory):
    """A Llama with a chat template, one without (DialoGPT's EOS-separated turns), and a model of
    each other family the engine's own transformer runs (sliding windows of 8 positions among them)."""
    if request.param == "plain-llama":
        source = builders.build_plain_llama(tmp_path_factory.mktemp("models") / "plain-llama")
    elif request.param in ("qwen2", "qwen3", "gemma3", "mistral"):
        # Float weights: a random model's near-tied logits would otherwise flip between a prompt read
        # whole and the same tokens read in other pieces (its cached prefix, then the rest).
        source = builders.build_tiny_family(tmp_path_factory.mktemp("models") / request.param, request.param)
        return model.load(ModelSettings(source=str(source), quantization="none"))
    else:
        source = tiny_models[request.param]
    return model.load(ModelSettings(source=str(source)))


def engines(loaded, **settings) -> tuple[Engine, Engine]:
    """Two engines on one model: the prefix cache on, and off."""
    return (Engine(loaded, EngineSettings(**settings)),
            Engine(loaded, EngineSettings(**(settings | {"prefix_cache": False}))))


async def reply(engine: Engine, messages: list[ChatMessage], sampling=GREEDY):
    generation = engine.submit(messages, sampling)
    return "".join([piece async for piece in generation]), generation


def converse(engine: Engine, turns=TURNS, sampling=GREEDY, rewrite=None) -> list:
    """A conversation grown turn by turn as a chat client sends it (the whole history each time);
    `rewrite(history)` may change the history before each turn. Returns each turn's Generation
    and reply."""
    async def run():
        history, results = [], []
        for text in turns:
            history = (rewrite(history) if rewrite else history) + [ChatMessage(role="user", content=text)]
            answer, generation = await reply(engine, history, sampling)
            history = history + [ChatMessage(role="assistant", content=answer)]
            results.append((answer, generation))
        return results
    return asyncio.run(run())


def test_each_turn_reads_only_what_is_new_and_replies_as_without_the_cache(loaded):
    cached, uncached = engines(loaded)
    try:
        for sampling in (GREEDY, SEEDED):
            with_cache, without = converse(cached, sampling=sampling), converse(uncached, sampling=sampling)
            assert [answer for answer, _ in with_cache] == [answer for answer, _ in without]
        assert all(generation.cached_tokens == 0 for _, generation in without)
        turns = [generation for _, generation in converse(cached, turns=[f"New {t}" for t in TURNS])]
    finally:
        cached.shutdown(), uncached.shutdown()
    assert turns[0].cached_tokens < turns[0].prompt_tokens
    for previous, turn in zip(turns, turns[1:]):
        # At least the previous turn's whole prompt (its reply too, if it re-tokenises as generated).
        assert previous.prompt_tokens <= turn.cached_tokens < turn.prompt_tokens
    assert cached.prefix_cache.stats.hit_tokens > 0


def test_a_rewritten_history_reuses_only_what_still_matches(loaded):
    """An edited earlier reply (as a reply re-tokenised differently from how it was generated
    looks) and a template that rewrites the conversation's start: the match ends at the first
    token that differs, and the replies are those of reading everything."""
    def edit_replies(history):
        return [m.model_copy(update={"content": m.content[:3] + "!"}) if m.role == "assistant" else m
                for m in history]

    cached, uncached = engines(loaded)
    try:
        edited = converse(cached, rewrite=edit_replies)
        assert [a for a, _ in edited] == [a for a, _ in converse(uncached, rewrite=edit_replies)]
        assert all(g.cached_tokens < g.prompt_tokens for _, g in edited)
        if loaded.tokenizer.chat_template:
            loaded.tokenizer.chat_template = COUNTING
            try:
                turns = [f"Again: {t}" for t in TURNS]
                counting = converse(cached, turns=turns)
                assert [a for a, _ in counting] == [a for a, _ in converse(uncached, turns=turns)]
            finally:
                loaded.tokenizer.chat_template = builders.CHATML
            prefix = len(loaded.tokenizer.encode("<|im_start|>system\n"))
            assert all(g.cached_tokens <= prefix for _, g in counting[1:])  # the count differs each turn
    finally:
        cached.shutdown(), uncached.shutdown()


def test_prompts_read_in_chunks_continue_from_a_cached_prefix(loaded):
    cached, uncached = engines(loaded, prefill_chunk=4)
    try:
        with_cache, without = converse(cached), converse(uncached)
    finally:
        cached.shutdown(), uncached.shutdown()
    assert [a for a, _ in with_cache] == [a for a, _ in without]
    assert sum(g.cached_tokens for _, g in with_cache) > 0


def test_a_cancelled_reply_is_kept_for_the_next_turn(loaded):
    engine = Engine(loaded)
    history = [ChatMessage(role="user", content="Tell me a long story.")]

    async def cancel_then_go_on():
        generation = engine.submit(history, ResolvedSampling(max_new_tokens=400, temperature=0.0, top_p=1.0))
        stream = aiter(generation)
        partial = await anext(stream) + await anext(stream)
        await stream.aclose()
        while engine.in_flight:
            await asyncio.sleep(0.01)
        follow_up = history + [ChatMessage(role="assistant", content=partial),
                               ChatMessage(role="user", content="Go on.")]
        return generation, (await reply(engine, follow_up))[1]

    try:
        cancelled, follow_up = asyncio.run(cancel_then_go_on())
    finally:
        engine.shutdown()
    assert cancelled.cancelled and cancelled.completion_tokens < 400
    assert follow_up.cached_tokens >= cancelled.prompt_tokens


def test_the_cache_stays_within_what_the_kv_budget_leaves(loaded):
    # The rows of 8 replies reserve 8 x 256 tokens (each rounded up to a step) and one of their
    # tensors reallocated, the prompts being read up to 200 more, and the cache gets the rest:
    # 300 tokens, less than the 20 replies hold.
    rows = 8 * STEP + 8 * STEP // (2 * loaded.model.config.num_hidden_layers)
    budget_mb = token_bytes(loaded.model.config, 4) * (rows + 200 + 300) / 2**20
    engine = Engine(loaded, EngineSettings(kv_cache_mb=budget_mb))

    async def many():
        return await asyncio.gather(*(reply(engine, [ChatMessage(role="user", content=f"Story {i}: once upon a time")])
                                      for i in range(20)))

    try:
        replies = asyncio.run(many())
    finally:
        engine.shutdown()
    assert all(g.finish_reason == "length" for _, g in replies)
    stats = engine.prefix_cache.stats
    assert 0 < stats.bytes <= budget_mb * 2**20
    assert stats.evictions > 0
    assert engine.kv_usage.peak <= budget_mb * 2**20


def kv(length: int) -> list[torch.Tensor]:
    return [torch.zeros(1, length, 4)]  # one layer, one head, 4 dims: 16 bytes a token


def test_lookup_matches_the_longest_common_prefix_and_leaves_a_token_to_read():
    cache = PrefixCache(budget_bytes=10_000)
    cache.store([1, 2, 3, 4], kv(4), kv(4))
    # The match ends where the tokens differ, and before the last token: its logits start the reply.
    for prompt, matched in (([1, 2, 3, 4, 5], 4), ([1, 2, 9, 4, 5], 2), ([1, 2, 3, 4], 3)):
        hit = cache.lookup(prompt)
        assert hit.length == matched
        hit.release()
    assert cache.lookup([7, 1, 2]) is None
    cache.store([1, 2, 3, 4, 5, 6], kv(6), kv(6))  # extends the first entry, which goes
    assert len(cache) == 1 and cache.stats.bytes == 2 * 6 * 16
    cache.store([1, 2, 3], kv(3), kv(3))  # held already, inside the longer one
    assert len(cache) == 1
    assert cache.stats.queried_tokens == 5 + 5 + 4 + 3 and cache.stats.hit_tokens == 4 + 2 + 3


def test_eviction_drops_the_least_recently_used_entry_no_request_holds():
    cache = PrefixCache(budget_bytes=3 * 2 * 10 * 16)  # room for three entries of 10 tokens
    for first in (1, 2, 3):
        cache.store([first] * 10, kv(10), kv(10))
    held = cache.lookup([1] * 10 + [0])  # entry 1: used last, and pinned until released
    cache.store([4] * 10, kv(10), kv(10))
    assert cache.lookup([2] * 11) is None and cache.stats.evictions == 1  # 2 was least recently used
    cache.store([5] * 10, kv(10), kv(10))  # evicts 3; 1 is the oldest use now, but held
    cache.store([6] * 10, kv(10), kv(10))  # so 4 goes
    assert cache.stats.evictions == 3 and cache.stats.bytes == cache.budget_bytes
    assert cache.lookup([4] * 11) is None
    assert cache.lookup([1] * 11).length == 10
    held.release()
