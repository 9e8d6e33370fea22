"""The engine reads a converted copy's tokenizer itself (loading._load_tokenizer: tokenizer.json
once, with tokenizer_config.json's settings), not through AutoTokenizer: the same tokenizer,
in a fraction of the time a sleeping model's wake had spent on it."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from backend.config import DeployConfig
from backend.engine.loading import _COMPLETE, _load_tokenizer
from backend.engine.location import converted_cache, locate

TEXTS = ["The capital of Germany is", "Écris « bonjour » 🙂 中文\n\n  two spaces", "<bos>literal special tokens<eos>",
         "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>", ""]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def shipped_copies() -> list:
    """Each model of the shipped deploy.yaml, by name, with the folder of its converted copy."""
    copies = []
    for model in DeployConfig.read().textbot().models:
        settings = model.model_settings()
        copies.append(pytest.param(converted_cache(settings, locate(settings)), id=model.served_name))
    return copies


@pytest.mark.parametrize("folder", shipped_copies())
def test_a_converted_copys_tokenizer_reads_as_autotokenizer_reads_it(folder: Path):
    assert (folder / _COMPLETE).is_file(), f"{folder} is not prepared: make test prepares every model first"
    ours, theirs = _load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        ids = theirs(text)["input_ids"]
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.chat_template == theirs.chat_template
    if theirs.chat_template:
        assert (ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
                == theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True))
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert ours.get_vocab() == theirs.get_vocab()
