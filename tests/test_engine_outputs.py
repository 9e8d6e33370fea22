"""What the engine gives programs, in-process on the tiny models: replies held to a JSON
schema, several replies to one prompt, stop strings, log-probabilities, and prompts that are
plain text or token ids."""

import asyncio
import json
import math

import jsonschema
import pytest

from backend.engine import Engine
from backend.engine import loading as model
from backend.errors import InvalidSamplingError
from backend.protocol import ChatMessage, OutputSchema, ResolvedSampling
from backend.settings import ModelSettings

HELLO = [ChatMessage(role="user", content="Hello there!")]
GREEDY = ResolvedSampling(max_new_tokens=24, temperature=0.0, top_p=1.0)
# Bounded, so a random model's reply must end within the budget: enums, bounded integers, short strings.
PERSON = {"type": "object", "required": ["name", "age", "colour", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}},
}}


@pytest.fixture(scope="module", params=["tiny-chat", "tiny-gpt2"])
def engine(request, tiny_models):
    engine = Engine(model.load(ModelSettings(source=str(tiny_models[request.param]))))
    yield engine
    engine.shutdown()


async def run(generation) -> tuple[str, list]:
    text, logprobs = "", []
    async for piece in generation:
        text += piece
        logprobs += generation.logprobs
    return text, logprobs


def replies(engine, prompt, sampling, n=1):
    async def all_of():
        return await asyncio.gather(*(run(g) for g in engine.submit_choices(prompt, sampling, n)))

    return asyncio.run(all_of())


def test_every_reply_follows_the_schema_even_from_a_random_model(engine):
    sampling = ResolvedSampling(max_new_tokens=200, temperature=1.0, top_p=1.0, seed=11,
                                output_schema=OutputSchema(json_schema=PERSON, strict=True))
    results = replies(engine, HELLO, sampling, n=4)
    for text, _ in results:
        jsonschema.validate(json.loads(text), PERSON)
    assert len({text for text, _ in results}) > 1  # four seeds, not one reply four times
    assert engine.in_flight == 0


def test_json_object_mode_gives_an_object_and_extra_properties_are_not_invented(engine):
    closed = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    sampling = GREEDY.model_copy(update={"max_new_tokens": 60, "output_schema": OutputSchema(json_schema=closed)})
    [(text, _)] = replies(engine, HELLO, sampling)
    assert set(json.loads(text)) == {"ok"}


@pytest.mark.parametrize(("schema", "strict", "problem"), [
    ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, False, "does not exist"),
    ({"type": "array", "uniqueItems": True}, True, "uniqueItems"),
])
def test_a_schema_the_grammar_cannot_enforce_is_refused_at_submit(engine, schema, strict, problem):
    sampling = GREEDY.model_copy(update={"output_schema": OutputSchema(json_schema=schema, strict=strict)})

    async def submit():
        engine.submit(HELLO, sampling)

    with pytest.raises(InvalidSamplingError, match=problem) as refused:
        asyncio.run(submit())
    assert refused.value.param == "response_format"
    assert engine.in_flight == 0


def test_without_strict_unenforceable_keywords_are_ignored(engine):
    schema = {"type": "array", "uniqueItems": True, "maxItems": 2, "items": {"type": "boolean"}}
    sampling = GREEDY.model_copy(update={"max_new_tokens": 40, "output_schema": OutputSchema(json_schema=schema)})
    [(text, _)] = replies(engine, HELLO, sampling)
    assert isinstance(json.loads(text), list)


def test_choices_share_the_prompt_and_each_samples_with_its_own_seed(engine):
    sampled = ResolvedSampling(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=5)
    three = replies(engine, HELLO, sampled, n=3)
    # Choice i samples as a lone request with seed + i would.
    alone = [replies(engine, HELLO, sampled.model_copy(update={"seed": 5 + i}))[0] for i in range(3)]
    assert [text for text, _ in three] == [text for text, _ in alone]
    greedy = replies(engine, HELLO, GREEDY, n=2)
    assert greedy[0] == greedy[1] == replies(engine, HELLO, GREEDY)[0]


def test_more_choices_than_the_batch_holds_are_refused(engine):
    async def submit():
        engine.submit_choices(HELLO, GREEDY, 9)

    with pytest.raises(InvalidSamplingError, match="n must be between 1 and 8"):
        asyncio.run(submit())


def test_a_stop_string_ends_the_reply_before_it(engine):
    [(whole, _)] = replies(engine, HELLO, GREEDY)
    stop = whole[5:8]
    [(cut, _)] = replies(engine, HELLO, GREEDY.model_copy(update={"stop": (stop, "never-seen")}))
    assert cut == whole[:whole.index(stop)]


def test_logprobs_cover_every_token_and_list_the_likeliest_first(engine):
    sampling = GREEDY.model_copy(update={"logprobs": 3})
    generations = []

    async def one():
        generations.append(engine.submit(HELLO, sampling))
        return await run(generations[0])

    text, logprobs = asyncio.run(one())
    assert len(logprobs) == generations[0].completion_tokens == 24
    assert "".join(t.bytes.decode("utf-8", errors="replace") for t in logprobs).startswith(text[:1])
    for token in logprobs:
        assert len(token.top) == 3
        assert [a.logprob for a in token.top] == sorted((a.logprob for a in token.top), reverse=True)
        # Greedy: the chosen token is the likeliest.
        assert math.isclose(token.logprob, token.top[0].logprob) and token.logprob <= 0


def test_plain_text_and_token_id_prompts(engine):
    tokenizer = engine.loaded.tokenizer
    ids = tokenizer.encode("Once upon a time")
    [(from_text, _)] = replies(engine, "Once upon a time", GREEDY)
    [(from_ids, _)] = replies(engine, ids, GREEDY)
    assert from_text == from_ids and from_text

    async def submit():
        engine.submit([engine.vocab_size + 5], GREEDY)

    with pytest.raises(InvalidSamplingError, match="outside the vocabulary") as refused:
        asyncio.run(submit())
    assert refused.value.param == "prompt"


def test_a_stream_interval_joins_tokens_into_fewer_pieces_and_loses_none(tiny_models):
    """`stream_interval_ms`: tokens sampled within the interval go out as one piece. The reply's
    text, log-probabilities and token count are those of token-by-token streaming; only the
    number of pieces drops, and the first piece is never held."""
    from backend.settings import EngineSettings

    loaded = model.load(ModelSettings(source=str(tiny_models["tiny-chat"])))
    sampling = GREEDY.model_copy(update={"max_new_tokens": 40, "logprobs": 1})

    async def pieces(engine) -> tuple[list[str], list, int]:
        generation = engine.submit(HELLO, sampling)
        got, logprobs = [], []
        async for piece in generation:
            got.append(piece)
            logprobs += generation.logprobs
        return got, logprobs, generation.completion_tokens

    results = []
    for interval_ms in (0, 1000):  # every token; a piece a second at most
        engine = Engine(loaded, EngineSettings(stream_interval_ms=interval_ms))
        try:
            results.append(asyncio.run(pieces(engine)))
        finally:
            engine.shutdown()
    (each, each_logprobs, tokens), (joined, joined_logprobs, joined_tokens) = results
    assert tokens == joined_tokens == 40
    assert "".join(joined) == "".join(each) and len(each) >= 20
    assert joined_logprobs == each_logprobs and len(joined_logprobs) == 40
    # The first piece at once; the rest in one or two (the reply takes about a second at most).
    assert joined[0] == each[0] and len(joined) <= 3
