"""Incremental detokenization: token by token it must build exactly the text of a one-shot decode."""

import pytest
from transformers import AutoTokenizer

from pagedserve.frontend.detokenizer import IncrementalDetokenizer
from pagedserve.sampling_params import SamplingParams

TEXTS = [
    "Héllo wörld, ça va? 日本語のテキスト、絵文字 🚀 too.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams())
    deltas = [detok.add_tokens([t]) for t in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


def test_multibyte_characters_split_across_byte_tokens(tokenizer):
    # byte-level BPE with a tiny vocab splits these into several byte tokens each
    ids = tokenizer.encode("🚀日本", add_special_tokens=False)
    assert len(ids) > 2
    detok = IncrementalDetokenizer(tokenizer, SamplingParams())
    deltas = [detok.add_tokens([t]) for t in ids]
    assert "".join(deltas) == "🚀日本" and "" in deltas  # text held back until a character is whole


def test_stop_string_spanning_tokens_is_cut(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["fox jumps", "lazy"]))
    for t in ids:
        detok.add_tokens([t])
        if detok.stop_string:
            break
    assert detok.stop_string == "fox jumps" and detok.text == "The quick brown "


def test_earliest_stop_string_wins(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["dog", "quick"]))
    detok.add_tokens(tokenizer.encode("The quick brown dog", add_special_tokens=False))
    assert detok.stop_string == "quick" and detok.text == "The "


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)
    skip = IncrementalDetokenizer(tokenizer, SamplingParams())
    keep = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=False))
    for t in ids:
        skip.add_tokens([t])
        keep.add_tokens([t])
    assert skip.text == "hi" and keep.text == "<|im_start|>hi<|im_end|>"
