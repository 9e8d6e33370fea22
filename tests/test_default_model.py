"""The end-to-end path on the embedded default model, as deploy.yaml serves it."""

import json
import time

import requests

from backend.config import DeployConfig


def test_default_model_streams_a_story_token_by_token(base_url):
    started = time.monotonic()
    arrivals, pieces = [], []
    with requests.post(f"{base_url}/api/", params={"prompt": "Tell me a short story about a fox.",
                                                  "max_new_tokens": 48, "temperature": 0},
                       stream=True, timeout=300) as response:
        response.raise_for_status()
        for piece in response.iter_content(chunk_size=None, decode_unicode=True):
            arrivals.append(time.monotonic() - started)
            pieces.append(piece)

    story = "".join(pieces)
    assert len(pieces) > 5
    assert len(story.split()) > 10
    # The first piece comes while the rest is still being generated.
    assert arrivals[0] < arrivals[-1] / 2


def test_default_model_replies_in_non_ascii_text(base_url):
    response = requests.post(f"{base_url}/api/", params={"prompt": "Écris « bonjour » en français.",
                                                        "max_new_tokens": 24, "temperature": 0}, timeout=300)
    assert response.status_code == 200
    assert "\ufffd" not in response.text
    assert response.text.strip()


def test_default_model_answers_in_a_schema_and_calls_a_forced_tool(base_url):
    """Structured output and tools on the real model, through the openai SDK as programs call us."""

    import jsonschema
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/api/v1", api_key="unused", max_retries=0)
    person = {"type": "object", "required": ["name", "age", "city"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}}}
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=96,
        messages=[{"role": "user", "content": "Invent a person and give their name, age and city as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": person, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), person)

    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=64, tool_choice="required",
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                 "parameters": weather}}],
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather)


def test_health_reports_the_default_model(base_url):
    assert requests.get(f"{base_url}/api/health", timeout=30).json() == {
        "status": "ok", "model": "SmolLM2-135M-Instruct"}


def test_converted_weights_are_cached_and_load_as_the_same_model(base_url, tmp_path):
    """Later starts skip de-quantising the GGUF file: they load the converted copy,
    which must be the same model (same weights, same tokenizer, same context)."""
    import torch

    from backend.engine import loading as model

    settings = DeployConfig.read().textbot().default.model_settings()
    # No compiled step: building one in this fresh cache would take minutes (test_compiled.py tests it).
    settings = settings.model_copy(update={"cache_dir": str(tmp_path), "compile": False})
    from_gguf = model.load(settings)  # first start: converts and saves
    cache = model.converted_cache(settings, model.locate(settings))
    assert (cache / "model.safetensors").is_file()
    from_cache = model.load(settings)  # later starts: the converted copy

    gguf_weights, cached_weights = from_gguf.model.state_dict(), from_cache.model.state_dict()
    assert gguf_weights.keys() == cached_weights.keys()
    assert all(torch.equal(gguf_weights[name], cached_weights[name]) for name in gguf_weights)
    prompt = "Écris « bonjour » 🙂"
    assert from_cache.tokenizer.encode(prompt) == from_gguf.tokenizer.encode(prompt)
    assert from_cache.tokenizer.chat_template == from_gguf.tokenizer.chat_template
    assert (from_cache.context_length, from_cache.eos_token_ids) == (from_gguf.context_length, from_gguf.eos_token_ids)


def test_converted_copy_is_found_by_content_not_path(tmp_path):
    """Another install of the same GGUF file (a new virtualenv: another path, another mtime)
    finds the converted copy the first one made; another file does not."""
    import os
    import shutil

    from backend.engine.location import _fingerprint

    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(os.urandom(3 << 20))
    copy = tmp_path / "b" / "model.gguf"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, (1, 1))
    other = tmp_path / "c.gguf"
    other.write_bytes(os.urandom(3 << 20))
    assert _fingerprint(copy) == _fingerprint(first) != _fingerprint(other)


def test_converted_copy_loads_without_transformers_modelling_code(base_url):
    """A restart loads the default model's converted copy into the engine's own Llama module
    (backend/engine/modules.py) and its tokenizer directly: transformers' modelling code, whose
    import was 1.3 s of each engine process's start, stays unimported; so does torch's compiler (the
    compiled decode step loads through torch's C++ loader)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    settings = DeployConfig.read().textbot().default.model_settings().model_dump_json()
    script = f"""
import sys
from backend.engine.loading import load
from backend.engine.modules import CausalLM
from backend.settings import ModelSettings
loaded = load(ModelSettings.model_validate_json({settings!r}))
assert isinstance(loaded.model, CausalLM), type(loaded.model)
heavy = [name for name in ("transformers.modeling_utils", "torch._dynamo", "torch._inductor", "fastapi") if name in sys.modules]
assert not heavy, heavy
print("ok")
"""
    # The session's stack has loaded the default model already, so its converted copy exists.
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_float_weights_reply_the_same_with_the_prefix_cache_on_and_off():
    """On the default model with float weights (the reference), a conversation's greedy replies
    do not depend on whether its earlier turns came from the prefix cache. (With int4 weights
    they may: the kernel takes bfloat16 activations, and reading a prompt in other pieces moves
    logits by up to ~0.4; `python -m bench.conversations` measures how often replies differ.)"""
    import asyncio

    from backend.engine import Engine, load
    from backend.protocol import ChatMessage, ResolvedSampling
    from backend.settings import EngineSettings

    settings = DeployConfig.read().textbot().default.model_settings()
    loaded = load(settings.model_copy(update={"quantization": "none"}))
    cached, uncached = Engine(loaded), Engine(loaded, EngineSettings(prefix_cache=False))
    greedy = ResolvedSampling(max_new_tokens=24, temperature=0.0, top_p=1.0)

    async def converse(engine) -> tuple[list[str], int]:
        history, replies, reused = [], [], 0
        for question in ("Hi! What is the Moon?", "Why does it have craters?", "And the Sun?"):
            history.append(ChatMessage(role="user", content=question))
            generation = engine.submit(history, greedy)
            replies.append("".join([piece async for piece in generation]))
            reused += generation.cached_tokens
            history.append(ChatMessage(role="assistant", content=replies[-1]))
        return replies, reused

    try:
        (with_cache, reused), (without, none_reused) = asyncio.run(converse(cached)), asyncio.run(converse(uncached))
    finally:
        cached.shutdown(), uncached.shutdown()
    assert with_cache == without
    assert reused > 0 and none_reused == 0
