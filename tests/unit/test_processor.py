"""Tests of DalleMiniProcessor, DalleBartTokenizer and their Auto* registration.

Run: ``python -m pytest tests/unit/test_processor.py -q``.

A tiny byte-level BPE tokenizer is trained here and laid out like a released repo (vocab.json,
merges.txt, legacy tokenizer_config.json naming DalleBartTokenizer, config.json with the raw
``normalize_text`` / ``max_text_length`` keys, enwiki-words-frequency.txt), so nothing is read
from outside the test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from transformers import AutoProcessor, AutoTokenizer, BatchFeature

import dalle_flax
from dalle_flax import DalleBartTokenizer, DalleMiniProcessor, TextNormalizer
from dalle_flax import processing_dalle_mini
from dalle_flax.processing_dalle_mini import PROCESSOR_CONFIG_FILE, register
from dalle_flax.text_normalization import WORD_FREQUENCIES_FILE

BOS, PAD, EOS = 0, 1, 2
MAX_LEN = 8
CORPUS = [
    "a photo of a cat sitting on a red sofa", "sunset over the ocean", "a dog on the beach",
    "an oil painting of a harbour at dawn", "the happy new year party", "love art and sunset",
] * 5
WORDS = ["the", "a", "sunset", "beach", "happy", "new", "year", "love", "art"]
LEGACY_TOKENIZER_CONFIG = {
    "add_prefix_space": False, "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>",
    "errors": "replace", "mask_token": {"__type": "AddedToken", "content": "<mask>",
                                        "lstrip": True, "normalized": True, "rstrip": False,
                                        "single_word": False},
    "model_max_length": 1024, "pad_token": "<pad>", "sep_token": "</s>",
    "tokenizer_class": "DalleBartTokenizer", "trim_offsets": True, "unk_token": "<unk>",
}


def _write_json(path: Path, content: dict) -> None:
  path.write_text(json.dumps(content), encoding="utf-8")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
  """A folder laid out like dalle-mini/dalle-mini, with a tiny tokenizer."""
  folder = tmp_path_factory.mktemp("legacy_repo")
  bpe = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
  bpe.train_from_iterator(CORPUS, vocab_size=320, min_frequency=2, show_progress=False,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
  bpe.save_model(str(folder))
  vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
  vocab["<mask>"] = len(vocab)  # BART puts <mask> last
  _write_json(folder / "vocab.json", vocab)
  _write_json(folder / "tokenizer_config.json", LEGACY_TOKENIZER_CONFIG)
  _write_json(folder / "config.json", {"model_type": "dallebart", "normalize_text": True,
                                       "max_text_length": MAX_LEN, "d_model": 64})
  (folder / WORD_FREQUENCIES_FILE).write_text(
      "".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS)), encoding="utf-8")
  return folder


@pytest.fixture(scope="module")
def processor(repo: Path) -> DalleMiniProcessor:
  return DalleMiniProcessor.from_pretrained(repo)


def test_from_pretrained_reads_the_legacy_layout(processor: DalleMiniProcessor):
  assert isinstance(processor.tokenizer, DalleBartTokenizer)
  assert processor.normalize_text is True and processor.max_text_length == MAX_LEN
  assert processor.text_normalizer.has_word_list
  assert (processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id,
          processor.tokenizer.eos_token_id) == (BOS, PAD, EOS)


def test_output_layout(processor: DalleMiniProcessor):
  out = processor(["a cat", "sunset over the ocean"])
  assert isinstance(out, BatchFeature)
  assert list(out) == ["input_ids", "attention_mask", "negative_prompt_ids",
                       "negative_prompt_attention_mask", "input_ids_uncond",
                       "attention_mask_uncond"]
  for value in out.values():
    assert isinstance(value, np.ndarray) and value.dtype == np.int32 and value.shape == (2, MAX_LEN)
  for ids, mask in zip(out["input_ids"], out["attention_mask"]):
    n = int(mask.sum())
    assert mask.tolist() == [1] * n + [0] * (MAX_LEN - n)
    assert ids[0] == BOS and ids[n - 1] == EOS and (ids[n:] == PAD).all()
  # the first word carries the "Ġ" of the normalizer's leading space
  assert processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())[1].startswith("Ġ")


def test_unconditional_row_is_the_raw_empty_string(processor: DalleMiniProcessor):
  out = processor(["a cat", "a dog", "the beach"])
  row = [BOS, EOS] + [PAD] * (MAX_LEN - 2)
  assert out["input_ids_uncond"].tolist() == [row] * 3
  assert out["attention_mask_uncond"].tolist() == [[1, 1] + [0] * (MAX_LEN - 2)] * 3
  assert out["negative_prompt_ids"] is out["input_ids_uncond"]
  assert out["negative_prompt_attention_mask"] is out["attention_mask_uncond"]
  # normalizing "" would give " " -> [<s>, "Ġ", </s>]: the uncond row must not do that
  assert processor([""])["input_ids"][0, 2] == EOS


def test_single_string_equals_a_list_of_one(processor: DalleMiniProcessor):
  single, listed = processor("A #SunsetBeach"), processor(["A #SunsetBeach"])
  for key in listed:
    np.testing.assert_array_equal(single[key], listed[key])
  assert single["input_ids"].shape == (1, MAX_LEN)


def test_prompts_are_normalized_only_when_asked(repo: Path, processor: DalleMiniProcessor):
  raw = DalleMiniProcessor.from_pretrained(repo, normalize_text=False)
  assert raw.text_normalizer is None
  prompt = "Happy #NewYear!!"
  assert raw.normalize(prompt) == prompt
  assert processor.normalize(prompt) == " happy new year"
  np.testing.assert_array_equal(raw([" happy new year"])["input_ids"],
                                processor([prompt])["input_ids"])
  assert not np.array_equal(raw([prompt])["input_ids"], processor([prompt])["input_ids"])


def test_negative_prompt_is_normalized_and_repeated(processor: DalleMiniProcessor):
  out = processor(["a cat", "a dog"], negative_prompt="The BEACH!")
  expected = processor(["The BEACH!"])["input_ids"][0]
  assert out["negative_prompt_ids"].tolist() == [expected.tolist()] * 2
  assert out["input_ids_uncond"] is out["negative_prompt_ids"]
  per_prompt = processor(["a cat", "a dog"], negative_prompt=["sunset", "art"])
  np.testing.assert_array_equal(per_prompt["negative_prompt_ids"],
                                processor(["sunset", "art"])["input_ids"])
  # an empty negative prompt keeps the original raw unconditional row
  np.testing.assert_array_equal(processor(["a cat"], negative_prompt="")["negative_prompt_ids"],
                                processor(["a cat"])["input_ids_uncond"])


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((123,), {}, TypeError, "text must be a string or a list of strings, got int"),
    ((["a cat", 3],), {}, TypeError, r"text\[1\] must be a string, got int"),
    ((b"a cat",), {}, TypeError, "got bytes"),
    (([],), {}, ValueError, "empty list"),
    ((["a", "b"],), {"negative_prompt": 5}, TypeError, "negative_prompt must be a string"),
    ((["a", "b"],), {"negative_prompt": ["x", "y", "z"]}, ValueError,
     "3 negative prompts for 2 prompts"),
    ((["a"],), {"return_tensors": "pt"}, ValueError, "return_tensors must be 'np' or 'jax'"),
])
def test_call_errors(processor: DalleMiniProcessor, args, kwargs, error, match):
  with pytest.raises(error, match=match):
    processor(*args, **kwargs)


def test_constructor_errors(processor: DalleMiniProcessor):
  with pytest.raises(ValueError, match="at least 2"):
    DalleMiniProcessor(processor.tokenizer, max_text_length=1)
  with pytest.raises(TypeError, match="max_text_length must be an int, got str"):
    DalleMiniProcessor(processor.tokenizer, max_text_length="64")
  with pytest.raises(TypeError, match="normalize_text must be a bool"):
    DalleMiniProcessor(processor.tokenizer, normalize_text="yes")
  with pytest.raises(TypeError, match="text_normalizer must be a TextNormalizer"):
    DalleMiniProcessor(processor.tokenizer, text_normalizer=str.lower)
  with pytest.raises(TypeError, match="PreTrainedTokenizerBase"):
    DalleMiniProcessor("not a tokenizer")


def test_truncation_keeps_the_end_token_and_warns(processor: DalleMiniProcessor, caplog):
  long_prompt = "a photo of a cat sitting on a red sofa at sunset on the beach"
  full = len(processor.tokenizer(processor.normalize(long_prompt))["input_ids"])
  assert full > MAX_LEN
  with caplog.at_level(logging.WARNING, logger=processing_dalle_mini.__name__):
    out = processor(["a cat", long_prompt])
  assert out["input_ids"][1, -1] == EOS and out["attention_mask"][1].all()
  (record,) = [r for r in caplog.records if r.name == processing_dalle_mini.__name__]
  message = record.getMessage()
  assert f"prompt 1 dropped {full - MAX_LEN} token(s)" in message and "prompt 0" not in message
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=processing_dalle_mini.__name__):
    processor(["a cat"], negative_prompt=long_prompt)
  assert any("negative prompt 0 dropped" in r.getMessage() for r in caplog.records)


def test_return_tensors_jax(processor: DalleMiniProcessor):
  import jax

  out = processor(["a cat"], return_tensors="jax")
  assert isinstance(out["input_ids"], jax.Array) and out["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(out["input_ids"], processor(["a cat"])["input_ids"])


def test_settings_precedence(repo: Path, tmp_path: Path):
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((repo / name).read_bytes())
  # no config.json: the original DalleBartConfig defaults
  bare = DalleMiniProcessor.from_pretrained(tmp_path)
  assert (bare.normalize_text, bare.max_text_length) == (False, 64)
  # composite config: keys under text_config
  _write_json(tmp_path / "config.json", {"text_config": {"normalize_text": True,
                                                         "max_text_length": 12}})
  composite = DalleMiniProcessor.from_pretrained(tmp_path)
  assert (composite.normalize_text, composite.max_text_length) == (True, 12)
  assert not composite.text_normalizer.has_word_list  # no word file here: tolerated
  # processor_config.json wins over config.json, explicit arguments over both
  _write_json(tmp_path / PROCESSOR_CONFIG_FILE, {"processor_class": "DalleMiniProcessor",
                                                 "max_text_length": 10})
  assert DalleMiniProcessor.from_pretrained(tmp_path).max_text_length == 10
  assert DalleMiniProcessor.from_pretrained(tmp_path, max_text_length=20).max_text_length == 20
  (tmp_path / PROCESSOR_CONFIG_FILE).write_text("{not json", encoding="utf-8")
  with pytest.raises(ValueError, match="not valid JSON"):
    DalleMiniProcessor.from_pretrained(tmp_path)


def test_from_pretrained_rejects_unknown_keywords(repo: Path):
  with pytest.raises(TypeError, match=r"unexpected keyword arguments \['max_length'\]"):
    DalleMiniProcessor.from_pretrained(repo, max_length=16)


def test_save_and_load_round_trip(processor: DalleMiniProcessor, tmp_path: Path):
  written = processor.save_pretrained(tmp_path)
  names = {p.name for p in tmp_path.iterdir()}
  assert {PROCESSOR_CONFIG_FILE, WORD_FREQUENCIES_FILE, "tokenizer_config.json"} <= names
  assert "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names
  assert str(tmp_path / WORD_FREQUENCIES_FILE) in written
  assert json.loads((tmp_path / PROCESSOR_CONFIG_FILE).read_text()) == {
      "processor_class": "DalleMiniProcessor", "normalize_text": True, "max_text_length": MAX_LEN}
  assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == (
      "DalleBartTokenizer")
  reloaded = DalleMiniProcessor.from_pretrained(tmp_path)
  prompts = ["A #SunsetBeach", "love art", "a photo of a cat sitting on a red sofa"]
  for key, value in processor(prompts).items():
    np.testing.assert_array_equal(reloaded(prompts)[key], value)
  assert reloaded.normalize("#happynewyear") == " happy new year"


def test_auto_classes_resolve_our_names(repo: Path, processor: DalleMiniProcessor,
                                        tmp_path: Path):
  register()  # idempotent: importing dalle_flax already ran it
  register()
  assert type(AutoTokenizer.from_pretrained(repo)) is DalleBartTokenizer  # legacy class name
  processor.save_pretrained(tmp_path)
  loaded = AutoProcessor.from_pretrained(tmp_path)
  assert type(loaded) is DalleMiniProcessor
  assert (loaded.normalize_text, loaded.max_text_length) == (True, MAX_LEN)
  assert type(AutoTokenizer.from_pretrained(tmp_path)) is DalleBartTokenizer


def test_auto_processor_on_a_released_layout(repo: Path):
  """Without processor_config.json, AutoProcessor maps config.json's model type to us."""
  from dalle_flax import configuration_dalle_mini

  if not hasattr(configuration_dalle_mini, "DalleBartConfig"):
    pytest.skip("configuration_dalle_mini.DalleBartConfig is not available yet")
  configuration_dalle_mini.register()
  register()
  loaded = AutoProcessor.from_pretrained(repo)
  assert type(loaded) is DalleMiniProcessor and loaded.max_text_length == MAX_LEN


@pytest.fixture
def hub(request):
  try:
    return request.getfixturevalue("local_hub")
  except pytest.FixtureLookupError:
    pytest.skip("the local_hub fixture (dalle_flax.testing.pytest_plugin) is not registered")


def test_push_to_hub_and_load_by_repo_id(processor: DalleMiniProcessor, hub, tmp_path: Path):
  processor.push_to_hub("me/tiny-dalle-processor")
  files = set(hub.api.list_repo_files("me/tiny-dalle-processor"))
  assert {PROCESSOR_CONFIG_FILE, WORD_FREQUENCIES_FILE, "tokenizer_config.json"} <= files
  processor.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/other",
                            commit_message="add processor")
  assert set(hub.api.list_repo_files("me/other")) >= files - {"README.md"}
  loaded = DalleMiniProcessor.from_pretrained("me/tiny-dalle-processor", revision="main")
  assert loaded.text_normalizer.has_word_list
  np.testing.assert_array_equal(loaded(["#happynewyear"])["input_ids"],
                                processor(["#happynewyear"])["input_ids"])
  assert type(AutoProcessor.from_pretrained("me/tiny-dalle-processor")) is DalleMiniProcessor


def test_package_exports():
  assert dalle_flax.TextNormalizer is TextNormalizer
  assert dalle_flax.DalleBartTokenizer is DalleBartTokenizer
  assert dalle_flax.DalleMiniProcessor is DalleMiniProcessor


def test_tokenizer_built_from_files_takes_the_4x_and_5x_names(repo: Path, processor: DalleMiniProcessor):
  """transformers 5's RobertaTokenizer drops vocab_file= / merges_file= (4.x names) without a
  word and keeps only its special tokens; ours reads them."""
  files = {"vocab": str(repo / "vocab.json"), "merges": str(repo / "merges.txt")}
  expected = processor.tokenizer(" a red circle")["input_ids"]
  for kwargs in (files, {f"{k}_file": v for k, v in files.items()}):
    tokenizer = DalleBartTokenizer(**kwargs)
    assert len(tokenizer) == len(processor.tokenizer) > 5
    assert tokenizer(" a red circle")["input_ids"] == expected
  for name in ("vocab", "merges"):
    with pytest.raises(ValueError, match=f"got {name} but no"):
      DalleBartTokenizer(**{f"{name}_file": files[name]})
