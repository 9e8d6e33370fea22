"""Incremental detokenization on a real byte-level BPE tokenizer."""

import pytest

from backend.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from tests.tiny_models import CHATML, build_tokenizer

TEXTS = [
    "Hello there! How are you today?",
    "Crème brûlée and a naïve café in the Straße.",
    "日本語のテキスト、中文文本 and 한국어 텍스트",
    "Rockets 🚀 and parties 🎉, prices in € and ¥.",
    "  leading spaces,\ttabs\nand newlines  ",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CHATML)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_rebuild_the_text_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]

    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte-level tokens in this tiny vocabulary"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🚀"


def test_special_tokens_are_not_emitted(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("Hi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(detokenizer.push(i) for i in ids) + detokenizer.flush() == "Hi"


def test_bytes_that_never_form_a_character_do_not_stall_the_stream(tokenizer):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    stray_continuation_byte = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[0x80])
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(stray_continuation_byte) for _ in range(8)]
    assert all(pieces[3::4])  # released after at most four held tokens
    assert "".join(pieces) + detokenizer.flush() == REPLACEMENT_CHAR * 8


def test_stop_strings_name_the_one_that_ended_the_text():
    """The first stop string in the text wins, whichever is listed first; one split across
    pieces is held back until it shows, and then named (the Messages API's `stop_sequence`)."""
    from backend.engine.stops import StopStrings

    stops = StopStrings(["world", "lo w"])
    assert stops.push("Hel") == ("He", False)  # "l" could start "lo w"
    assert stops.push("lo") == ("l", False)
    assert stops.push(" world") == ("", True)  # "lo world": "lo w" comes first
    assert stops.matched == "lo w"
    assert StopStrings(["x"]).matched is None
