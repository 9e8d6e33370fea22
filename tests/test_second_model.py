"""The real second model, end to end through the API: Gemma 3 270M (base, Q4_K_M) from its PyPI
package, served by the engine's own transformer (backend/engine/families/gemma3.py) with its
slot cache and prefix cache. A base model has no chat template: the chat routes give it the plain
template the README names (each turn's text, then the EOS token)."""

from openai import OpenAI

GEMMA = "gemma-3-270m"


def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=f"{base_url}/gemma/v1", api_key="unused", max_retries=0, timeout=120)


def test_gemma_is_listed_as_running_on_the_engines_own_transformer(base_url):
    [card] = client(base_url).models.list().data
    assert (card.id, card.loaded, card.engine, card.quantization) == (GEMMA, True, "textbot", "int4")
    # Gemma's context is 32768 tokens; the default KV budget (768 MB, 36 KB a token) holds one
    # conversation of 10752 (kv_budget.KvBudget.context_tokens), and that is what a client is told.
    assert card.context_length == 10752


def test_gemma_completes_a_text_greedily_and_reads_a_repeated_prompt_from_its_prefix_cache(base_url):
    prompt = "The capital of France is Paris. The capital of Germany is"
    first = client(base_url).completions.create(model=GEMMA, prompt=prompt, max_tokens=8, temperature=0)
    again = client(base_url).completions.create(model=GEMMA, prompt=prompt, max_tokens=8, temperature=0)
    print(repr(first.choices[0].text))
    assert "Berlin" in first.choices[0].text  # a real model, read right: its sliding windows, norms and Q4_K weights
    assert first.usage.completion_tokens == 8 or first.choices[0].finish_reason == "stop"
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_a_conversation_with_gemma_reads_each_turn_from_the_prefix_cache(base_url):
    openai, messages, cached = client(base_url), [], []
    for question in ["Hello!", "What is the tallest mountain?", "And the longest river?", "Thank you."]:
        messages.append({"role": "user", "content": question})
        reply = openai.chat.completions.create(model=GEMMA, messages=messages, max_tokens=12, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        assert reply.choices[0].finish_reason in ("stop", "length")
    print("cached prompt tokens per turn:", cached)
    assert all(later > 0 for later in cached[1:])
