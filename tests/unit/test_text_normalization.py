"""Tests of the 23-step TextNormalizer and its hashtag splitter.

Run: ``python -m pytest tests/unit/test_text_normalization.py -q``.
"""

from __future__ import annotations

import logging
import random

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors
from hypothesis import given, settings
from hypothesis import strategies as st

from dalle_flax import text_normalization
from dalle_flax.text_normalization import WORD_FREQUENCIES_FILE, TextNormalizer, WordSplitter

# Stand-in for enwiki-words-frequency.txt, most frequent first (reference §5.1 examples were
# run with a stubbed dictionary too).
WORDS = ["the", "a", "of", "new", "year", "love", "art", "happy", "picture", "sunset", "beach",
         "top", "list", "dog", "dogs", "cat", "s", "'s"]


@pytest.fixture(scope="module")
def normalizer() -> TextNormalizer:
  return TextNormalizer(word_list=WORDS)


@pytest.mark.parametrize(("raw", "expected"), [
    # reference §5.1 examples
    ("Picture of a #SunsetBeach, 1,000 <b>dogs</b> http://x.com/a 😀",
     " picture of a sunset beach, 1000 dogs, grinning face"),
    ("“Quoted” text: e.g. 3.5 kg on 20/10/2021 -- it's rock-n-roll!!!!",
     ' " quoted " text, e.g, 3.5 kg on 20/10/2021, it\'s rock n, roll'),
    ("A <PERSON> and <PERSON> at the beach", " a people at the beach"),
    ("Cost: $5 & 50% off", " cost, $ 5 & 50 % off"),
    ("#happynewyear", " happy new year"),
    # 23: always one leading space, even for nothing
    ("", " "),
    ("  \t\n ", " "),
    # 1-5: mojibake, entities, emoji, transliteration, case
    ("cafÃ©", " cafe"),
    ("&amp;lt;3 &quot;hi&quot;", ' <3 " hi "'),
    ("<i>x</i> &amp;lt;3", " x <3"),  # with a tag ftfy leaves entities alone: 2 unescapes
    ("I ❤️ Zürich", " i, red heart, zurich"),
    ("ＦＵＬＬＷＩＤＴＨ", " fullwidth"),
    ("日本", " ri ben"),
    # 6: a run of <person> (with commas / "and") is " people "
    ("<person>, <person> and <person> dancing", " people dancing"),
    # 7: wiki references only at the very start or end
    ("[12] the beach [3]", " the beach"),
    ("the [12] beach", " the, 12, beach"),
    # 8-9: html tags become spaces, urls vanish
    ("a<br>b", " a b"),
    ("see https://example.com/x?y=1 now", " see now"),
    # 10: thousands separators, two passes
    ("1,000,000,000 stars", " 1000000000 stars"),
    # 11 + 17: protected dots, apostrophes and date slashes survive step 16
    ("v1.2.3 e.g. x", " v1.2, 3 e.g, x"),  # matches cannot overlap: "2.3" is cut
    ("they'll we're i've i'd i'm rock 'n' roll",
     ' they\'ll we\'re i\'ve i\'d i\'m rock " n " roll'),
    ("1/2 a/b", " 1/2 a, b"),
    # 12: in-word hyphens, spaced symbols
    ("well-known *stars*", " well known * stars *"),
    # 14-16: ignored chars, quotes, punctuation
    ("snake_case back\\slash", " snake case back slash"),
    ("`tick` (paren) [b] {c} a|b a;b a?b a=b a+b a~b",
     ' " tick ", paren, b, c, a, b a, b a, b a, b a, b a, b'),
    # 18: 4+ repeats collapse, 3 stay (roman numerals), digits never collapse
    ("wooooow viii 11111", " wow viii 11111"),
    # 19-22: merged quotes and commas, edge commas
    ('""" hi """', ' " hi "'),
    ("a ,, , b", " a, b"),
    (", a ,", " a"),
])
def test_normalizes_like_the_original(normalizer: TextNormalizer, raw: str, expected: str):
  assert normalizer(raw) == expected


@pytest.mark.parametrize(("word", "expected"), [
    ("sunsetbeach", "sunset beach"),
    ("happynewyear", "happy new year"),
    ("top10", "top 10"),  # unknown digits glue back together
    ("2021", "2021"),
    ("listx", "list x"),
    # Past an unknown prefix every split costs inf and ties go to the shortest last piece, so
    # the rest falls apart into letters: the original's behaviour (9e999 == inf), kept.
    ("xlist", "x l i s t"),
    ("dog's", "dog's"),  # a split "'s" is re-attached
    ("xyz", "x y z"),  # unknown text falls apart into letters, as in the original
    ("dog_cat", "dog cat"),  # cut at characters outside [a-zA-Z0-9']
    ("", ""),
])
def test_word_splitter(word: str, expected: str):
  assert WordSplitter(WORDS)(word) == expected


def test_word_splitter_prefers_frequent_words():
  # "thea" could be "the a" (ranks 0, 1) or "t hea"...; only the cheapest known split wins.
  assert WordSplitter(["the", "a", "th", "ea"])("thea") == "the a"
  assert WordSplitter(["th", "ea", "the", "a"])("thea") == "th ea"


def test_word_splitter_rejects_an_empty_list():
  with pytest.raises(ValueError, match="at least one word"):
    WordSplitter([])


def test_seeded_person_replacement_is_deterministic():
  text = " ".join(["<person> met"] * 20)
  first, second = TextNormalizer(seed=0)(text), TextNormalizer(seed=0)(text)
  assert first == second
  assert TextNormalizer(seed=1)(text) != first  # 20 weighted draws: differ for these seeds
  assert "<person>" not in first and "person" in first


def test_int_seed_makes_each_call_pure_and_a_random_stream_does_not():
  text = " ".join(["<person> met"] * 20)
  seeded = TextNormalizer(seed=3)
  assert seeded(text) == seeded(text)
  stream = TextNormalizer(seed=random.Random(3))
  first = stream(text)
  assert first == seeded(text)  # same seed, first draws
  assert stream(text) != first  # the stream moved on


def test_without_word_list_hashtags_lose_only_the_hash_and_log_once(caplog):
  plain = TextNormalizer()
  assert not plain.has_word_list
  with caplog.at_level(logging.WARNING, logger=text_normalization.__name__):
    assert plain("#SunsetBeach #LoveArt") == " sunsetbeach loveart"
    assert plain("#again") == " again"
  assert len([r for r in caplog.records if "unsplit" in r.getMessage()]) == 1


def test_constructor_argument_errors(tmp_path):
  with pytest.raises(ValueError, match="not both"):
    TextNormalizer(word_frequencies_path=tmp_path / "w.txt", word_list=WORDS)
  with pytest.raises(FileNotFoundError, match="is not a file"):
    TextNormalizer(word_frequencies_path=tmp_path / "missing.txt")
  with pytest.raises(TypeError, match="seed must be"):
    TextNormalizer(seed="0")
  with pytest.raises(TypeError, match="expects a str, got int"):
    TextNormalizer()(3)


def test_word_file_round_trip(tmp_path, normalizer: TextNormalizer):
  written = normalizer.save_word_frequencies(tmp_path)
  assert written == tmp_path / WORD_FREQUENCIES_FILE
  assert written.read_text().split() == WORDS
  reloaded = TextNormalizer.from_pretrained(tmp_path)
  assert reloaded.has_word_list
  assert reloaded("#SunsetBeach #happynewyear") == " sunset beach happy new year"
  # a file-backed normalizer copies its file; saving onto itself is a no-op
  assert reloaded.save_word_frequencies(tmp_path) == written
  assert TextNormalizer().save_word_frequencies(tmp_path / "none") is None


def test_word_file_uses_the_first_column_and_line_order(tmp_path):
  path = tmp_path / WORD_FREQUENCIES_FILE
  path.write_text("sunset 9\nbeach 7\n\nsun 3\nset 2\n", encoding="utf-8")
  assert TextNormalizer(word_frequencies_path=path)("#sunsetbeach") == " sunset beach"


def test_from_pretrained_tolerates_a_folder_without_the_file(tmp_path):
  assert not TextNormalizer.from_pretrained(tmp_path).has_word_list


def test_from_pretrained_downloads_from_a_repo_id(tmp_path, monkeypatch):
  words = tmp_path / WORD_FREQUENCIES_FILE
  words.write_text("sunset 2\nbeach 1\n", encoding="utf-8")
  calls = []

  def fake_download(repo_id, filename, **kwargs):
    calls.append((repo_id, filename, kwargs))
    return str(words)

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  loaded = TextNormalizer.from_pretrained("owner/model", revision="abc", local_files_only=True,
                                          cache_dir=tmp_path / "cache", token="t")
  assert loaded("#sunsetbeach") == " sunset beach"
  (repo_id, filename, kwargs), = calls
  assert (repo_id, filename) == ("owner/model", WORD_FREQUENCIES_FILE)
  assert kwargs["revision"] == "abc" and kwargs["local_files_only"] is True
  assert kwargs["token"] == "t" and kwargs["cache_dir"] == tmp_path / "cache"


@pytest.mark.parametrize("error", [hf_errors.EntryNotFoundError("absent"),
                                   hf_errors.LocalEntryNotFoundError("not cached")])
def test_from_pretrained_tolerates_a_repo_without_the_file(monkeypatch, error):
  def fake_download(*args, **kwargs):
    raise error

  monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
  assert not TextNormalizer.from_pretrained("owner/model").has_word_list


def test_from_pretrained_rejects_what_is_neither_folder_nor_repo_id(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
    TextNormalizer.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


_FRAGMENTS = st.sampled_from(["#", "<person>", "<b>", "</b>", "http://a.b", ",", ".", "'s", "'",
                              '"', "-", "_", "\\", "/", "1,000", "3.5", "[1]", "xtokx", " ",
                              "\t", "😀", "é", "Ã©", "&amp;", "sunset", "beach", "aaaa",
                              "日本"])
_TEXTS = st.one_of(st.text(max_size=60), st.lists(_FRAGMENTS, max_size=15).map("".join),
                   st.lists(st.one_of(_FRAGMENTS, st.text(max_size=3)), max_size=12).map("".join))


@settings(max_examples=200, deadline=None)
@given(_TEXTS)
def test_output_is_ascii_with_one_leading_space_and_no_double_spaces(text: str):
  out = TextNormalizer(word_list=WORDS)(text)
  assert out.isascii()
  assert out.startswith(" ") and not out.startswith("  ")
  assert "  " not in out
  assert out == out.rstrip() or out == " "
