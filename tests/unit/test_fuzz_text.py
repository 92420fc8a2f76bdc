"""Fuzzing the text path (normalizer, processor) with any unicode: never a crash, a hang or a blow-up.

Seeded (``derandomize=True``: the same examples every run) and bounded: 1,000 examples per target
in the default run and 9,000 more under the ``slow`` marker, 10,000 per target in all.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from fuzzing import DEFAULT_EXAMPLES, SLOW_EXAMPLES, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from dalle_flax import DalleMiniProcessor
from dalle_flax.text_normalization import TextNormalizer

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"

# every code point, lone surrogates and control characters included (hypothesis leaves out
# surrogates unless told)
ANY_CHAR = st.characters(codec=None, categories=None, exclude_categories=())
TEXTS = st.one_of(
    st.text(ANY_CHAR, max_size=200),
    st.text(st.sampled_from("aé \t\n\r\x00\x1b\u200b\u202e\ud800\udfff\U0001F600-.,!?'\"<>/\\#@&"), max_size=300),
    st.lists(st.sampled_from(["a", "red", "circle", "<s>", "</s>", "<pad>", "<mask>", "http://x.y",
                              "#tag", "@user", "1/2", "3.14", "don't", "\u00a0", "\ufeff"]),
             max_size=60).map(" ".join),
)


@pytest.fixture(scope="module")
def normalizer():
  return TextNormalizer()


@pytest.fixture(scope="module")
def processor():
  return DalleMiniProcessor.from_pretrained(TINY)


def _check_normalized(normalizer, text):
  out = normalizer(text)
  assert isinstance(out, str) and out.isascii()
  assert "  " not in out and "\x00" not in out
  assert len(out) <= 64 * len(text) + 16  # emoji become words; nothing explodes


def _check_processed(processor, prompts):
  batch = processor(prompts)
  ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
  assert ids.shape == mask.shape == (len(prompts), processor.max_text_length)
  assert ids.min() >= 0 and ids.max() < len(processor.tokenizer)
  assert set(np.unique(mask)) <= {0, 1} and (mask[:, 0] == 1).all()
  assert (np.diff(mask, axis=1) <= 0).all()  # the mask is a prefix of ones


@fuzz_settings(DEFAULT_EXAMPLES)
@given(TEXTS)
def test_normalizer_takes_any_text(normalizer, text):
  _check_normalized(normalizer, text)


@fuzz_settings(DEFAULT_EXAMPLES)
@given(st.lists(TEXTS, min_size=1, max_size=3))
def test_processor_takes_any_prompts(processor, prompts):
  _check_processed(processor, prompts)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(TEXTS)
def test_normalizer_takes_any_text_slow(normalizer, text):
  _check_normalized(normalizer, text)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(st.lists(TEXTS, min_size=1, max_size=3))
def test_processor_takes_any_prompts_slow(processor, prompts):
  _check_processed(processor, prompts)


@pytest.mark.parametrize("name,text", [
    ("1 MB of one letter", "x" * 2**20),
    ("1 MB of words", "a red circle " * (2**20 // 13)),
    ("1 MB of accents and a bidi override", "é" * 2**19 + "\u202e"),
    ("256 KB of control characters", "".join(chr(c) for c in range(32)) * 2**13),
    ("lone surrogates", "\ud800\udbff\udc00\udfff" * 1000),
])
def test_huge_and_hostile_prompts_finish(normalizer, processor, name, text):
  start = time.perf_counter()
  _check_normalized(normalizer, text)
  _check_processed(processor, [text])
  assert time.perf_counter() - start < 60, name  # a hang guard, not a speed target
