"""Golden text tests: our normalizer, tokenizer and processor against the original's outputs.

Run: ``python -m pytest tests/golden/test_golden_text.py -q``.

Every fixture folder in ``../shared/fixtures`` with ``expected/text_inputs.json`` and
``expected/text_inputs.npz`` is checked, following its README.txt:

* dallebart-* folders: ``DalleBartProcessor.from_pretrained(folder)`` at the config's
  ``max_text_length`` (16) with normalization (``*_norm``), the same tokenizer without it
  (``*_raw``), normalization at length 64 (``*_norm_len64``), the unconditional row, the
  normalized strings and the token strings.
* bart2021-seed: the 2021 slow ``BartTokenizer`` files, no normalization, length 16.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from dalle_flax import DalleMiniProcessor, TextNormalizer

pytestmark = pytest.mark.golden

# The versions the fixtures were made with (fixtures/reference-env-requirements.txt).
REFERENCE_TEXT_PACKAGES = {"ftfy": "6.3.1", "emoji": "2.16.0", "Unidecode": "1.4.0"}


def fixtures_root() -> Path | None:
  """``../shared/fixtures`` next to the repository checkout, or None when absent."""
  root = (Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures").resolve()
  return root if root.is_dir() else None


def _text_fixture_folders() -> list[Path]:
  root = fixtures_root()
  if root is None:
    return []
  return sorted(folder for folder in root.iterdir()
                if (folder / "expected" / "text_inputs.json").is_file()
                and (folder / "expected" / "text_inputs.npz").is_file())


_FOLDERS = _text_fixture_folders()
_PARAMS = [pytest.param(folder, id=folder.name) for folder in _FOLDERS] or [
    pytest.param(None, id="no-fixtures", marks=pytest.mark.skip(
        reason="../shared/fixtures with expected/text_inputs.{json,npz} not found next to the "
               "checkout; the golden text tests need them"))]


def _version_note() -> str:
  installed = {}
  for name in REFERENCE_TEXT_PACKAGES:
    try:
      installed[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      installed[name] = "missing"
  return (f"installed {installed}, fixtures made with {REFERENCE_TEXT_PACKAGES}; normalized "
          "text depends on these versions (emoji names in particular)")


@pytest.fixture(params=_PARAMS)
def fixture(request) -> tuple[Path, dict, dict]:
  folder = request.param
  expected = json.loads((folder / "expected" / "text_inputs.json").read_text(encoding="utf-8"))
  with np.load(folder / "expected" / "text_inputs.npz") as arrays:
    return folder, expected, dict(arrays)


def test_fixture_folders_are_found():
  if fixtures_root() is None:
    pytest.skip("../shared/fixtures not found next to the checkout")
  names = {folder.name for folder in _FOLDERS}
  assert {"dallebart-mini-like", "bart2021-seed"} <= names, names


def _assert_rows(processor: DalleMiniProcessor, prompts: list[str], ids: np.ndarray,
                 mask: np.ndarray, tokens: list[list[str]] | None, what: str) -> None:
  out = processor(prompts)
  assert out["input_ids"].dtype == ids.dtype == np.int32
  np.testing.assert_array_equal(out["input_ids"], ids, err_msg=f"{what} input_ids")
  np.testing.assert_array_equal(out["attention_mask"], mask, err_msg=f"{what} attention_mask")
  if tokens is not None:
    ours = [processor.tokenizer.convert_ids_to_tokens(row.tolist()) for row in out["input_ids"]]
    assert ours == tokens, what


def test_normalized_strings(fixture):
  folder, expected, _ = fixture
  if "normalized" not in expected:
    pytest.skip(f"{folder.name} records no normalized text (its README: no normalization)")
  normalizer = TextNormalizer.from_pretrained(folder)
  assert normalizer.has_word_list
  ours = [normalizer(prompt) for prompt in expected["prompts"]]
  for prompt, got, want in zip(expected["prompts"], ours, expected["normalized"]):
    assert got == want, f"{prompt!r}: {_version_note()}"


def test_token_ids_with_normalization(fixture):
  folder, expected, arrays = fixture
  if "input_ids_norm" not in arrays:
    pytest.skip(f"{folder.name} has no normalized token ids")
  processor = DalleMiniProcessor.from_pretrained(folder)  # settings from config.json
  assert (processor.normalize_text, processor.max_text_length) == (True, 16)
  _assert_rows(processor, expected["prompts"], arrays["input_ids_norm"],
               arrays["attention_mask_norm"], expected["tokens_norm"], "normalized, length 16")
  uncond = processor(expected["prompts"])
  n = len(expected["prompts"])
  np.testing.assert_array_equal(uncond["input_ids_uncond"],
                                np.repeat(arrays["input_ids_uncond"], n, axis=0))
  np.testing.assert_array_equal(uncond["attention_mask_uncond"],
                                np.repeat(arrays["attention_mask_uncond"], n, axis=0))


def test_token_ids_with_normalization_length_64(fixture):
  folder, expected, arrays = fixture
  if "input_ids_norm_len64" not in arrays:
    pytest.skip(f"{folder.name} has no length-64 token ids")
  processor = DalleMiniProcessor.from_pretrained(folder, max_text_length=64)
  assert processor.normalize_text
  _assert_rows(processor, expected["prompts"], arrays["input_ids_norm_len64"],
               arrays["attention_mask_norm_len64"], None, "normalized, length 64")


def test_token_ids_without_normalization(fixture):
  folder, expected, arrays = fixture
  if "input_ids_raw" in arrays:  # dallebart-*: same tokenizer, normalize_text=False
    processor = DalleMiniProcessor.from_pretrained(folder, normalize_text=False)
    ids, mask = arrays["input_ids_raw"], arrays["attention_mask_raw"]
    tokens = expected["tokens_raw"]
  else:  # bart2021-seed: no normalization in July 2021, tokenized at length 16
    processor = DalleMiniProcessor.from_pretrained(folder, max_text_length=16)
    assert not processor.normalize_text  # its config.json has no normalize_text key
    ids, mask, tokens = arrays["input_ids"], arrays["attention_mask"], expected["tokens"]
  assert processor.max_text_length == ids.shape[1] == 16
  _assert_rows(processor, expected["prompts"], ids, mask, tokens, "raw, length 16")
