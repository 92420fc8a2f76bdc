"""Fuzzing config loading: any config.json yields a config or a clear ValueError/OSError, nothing else.

Targets: ``DalleBartConfig``, ``VQGANConfig`` and the pipeline's ``DalleMiniConfig`` read from a
``config.json`` (wrong types, missing and extra keys, wrong ``model_type``, NaN/inf, nested junk,
absurd sizes, non-JSON bytes), through our ``from_pretrained`` and ``transformers.AutoConfig``;
and absurd sizes refused before allocation when a model is built. Seeded (``derandomize=True``)
and bounded: 1,000 examples per target by default and 9,000 more under ``slow`` (the model-size
target: 40 and 400, each one traces the model's shapes).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from fuzzing import DEFAULT_EXAMPLES, SLOW_EXAMPLES, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from transformers import AutoConfig

from dalle_flax import (
    DalleBartConfig,
    FlaxDalleMiniForConditionalGeneration,
    FlaxVQGANModel,
    VQGANConfig,
    modeling_flax_utils,
)
from dalle_flax.pipelines.configuration import DalleMiniConfig

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
PIPELINE_DICT = json.loads((TINY / "config.json").read_text())
TEXT_DICT = PIPELINE_DICT["text_config"]
VQGAN_DICT = PIPELINE_DICT["vqgan_config"]

SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2, 3, 7, 10**6, 10**9, 2**31, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "gelu", "relu", "layernorm", "rmsnorm", "swinv2", "postln", "dallebart", "vqgan",
                     "dalle-mini", "bart", "float16", "auto", "int99", "\ud800"]),
)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                    max_leaves=12)


def _mutated(base: dict):
  """A strategy of dicts: ``base`` with some keys replaced by junk, some dropped, some added."""
  keys = sorted(base)
  return st.tuples(
      st.dictionaries(st.sampled_from(keys), JUNK, max_size=4),
      st.lists(st.sampled_from(keys), max_size=3),
      st.dictionaries(st.text(min_size=1, max_size=10), JUNK, max_size=2),
  ).map(lambda t: {**{k: v for k, v in base.items() if k not in t[1]}, **t[0], **t[2]})


def _config_texts(base: dict):
  """config.json contents: mostly mutated dicts, sometimes any JSON value or raw bytes."""
  return st.one_of(
      _mutated(base).map(lambda d: json.dumps(d, allow_nan=True).encode()),
      _mutated(base).map(lambda d: json.dumps(d, allow_nan=True).encode()),
      _mutated(base).map(lambda d: json.dumps(d, allow_nan=True).encode()),
      JUNK.map(lambda v: json.dumps(v, allow_nan=True).encode()),
      st.binary(max_size=64),
      st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n),
      st.just(b'{"model_type": "dallebart", "d_model": 1e999}'),
  )


def _check_loads(folder: Path, content: bytes, cls, *, via_auto: bool) -> None:
  (folder / "config.json").write_bytes(content)
  start = time.perf_counter()
  try:
    config = cls.from_pretrained(folder)
  except (ValueError, OSError) as e:
    assert str(e), "an error must say what is wrong"
  else:
    assert isinstance(config, cls)
    _check_sane(config)
    # what was accepted round-trips through save_pretrained
    again_folder = folder / "again"
    config.save_pretrained(again_folder)
    again = cls.from_pretrained(again_folder)
    assert _settings(again) == _settings(config)
  if via_auto:
    try:
      parsed = json.loads(content)
    except (ValueError, RecursionError):
      return  # transformers' own JSON handling; covered by the from_pretrained call above
    if isinstance(parsed, dict) and parsed.get("model_type") == cls.model_type:
      try:
        config = AutoConfig.from_pretrained(folder)
      except (ValueError, OSError) as e:
        assert str(e)
      else:
        assert isinstance(config, cls)
  assert time.perf_counter() - start < 10


def _settings(config) -> dict:
  """The fields our class declares (transformers' bookkeeping keys such as label2id left out)."""
  own = {k for k, v in type(config).__annotations__.items() if "ClassVar" not in str(v)}
  return {k: _settings(getattr(config, k)) if hasattr(getattr(config, k), "to_dict") else getattr(config, k)
          for k in sorted(own)}


def _check_sane(config) -> None:
  if isinstance(config, DalleBartConfig):
    for name in ("d_model", "encoder_layers", "decoder_layers", "image_length", "max_text_length",
                 "encoder_vocab_size", "image_vocab_size", "encoder_ffn_dim", "decoder_ffn_dim"):
      value = getattr(config, name)
      assert isinstance(value, int) and not isinstance(value, bool) and value >= 1, (name, value)
    assert config.d_model % config.encoder_attention_heads == 0
    assert 0 <= config.dropout < 1 and math.isfinite(config.init_std)
    assert 0 <= config.decoder_start_token_id <= config.image_vocab_size
  elif isinstance(config, VQGANConfig):
    assert config.ch >= 1 and config.n_embed >= 1 and len(config.ch_mult) >= 1
    assert config.resolution % config.downsample_factor == 0
  elif isinstance(config, DalleMiniConfig):
    _check_sane(config.text_config)
    _check_sane(config.vqgan_config)


TARGETS = {
    "dallebart": (DalleBartConfig, TEXT_DICT),
    "vqgan": (VQGANConfig, VQGAN_DICT),
    "pipeline": (DalleMiniConfig, PIPELINE_DICT),
}


def _run(tmp_path_factory, target: str, content: bytes) -> None:
  cls, _ = TARGETS[target]
  folder = tmp_path_factory.mktemp(target)
  _check_loads(folder, content, cls, via_auto=True)


def _fuzz(tmp_path_factory, target: str, examples: int) -> None:
  @fuzz_settings(examples, HealthCheck.function_scoped_fixture)
  @given(_config_texts(TARGETS[target][1]))
  def run(content):
    _run(tmp_path_factory, target, content)

  run()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_config_files(tmp_path_factory, target):
  _fuzz(tmp_path_factory, target, DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_config_files_slow(tmp_path_factory, target):
  _fuzz(tmp_path_factory, target, SLOW_EXAMPLES)


# --- absurd sizes: refused from the shape tree, before anything is allocated ------------------
SIZE = st.one_of(st.integers(1, 48), st.sampled_from([10**5, 10**6, 10**7, 2**31, 10**12]))


@st.composite
def _sized_configs(draw):
  if draw(st.booleans()):
    heads = draw(st.sampled_from([1, 2, 4]))
    config = dict(TEXT_DICT, d_model=heads * draw(st.one_of(st.integers(1, 16), st.sampled_from([2**16, 2**24]))),
                  encoder_attention_heads=heads, decoder_attention_heads=heads)
    for key in ("encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_vocab_size",
                "image_vocab_size", "image_length", "max_text_length"):
      config[key] = draw(SIZE) if draw(st.integers(0, 3)) == 0 else TEXT_DICT[key]
    config["decoder_start_token_id"] = config["image_vocab_size"]
    return DalleBartConfig, FlaxDalleMiniForConditionalGeneration, config
  config = dict(VQGAN_DICT, ch=32 * draw(st.one_of(st.integers(1, 2), st.sampled_from([2**10, 2**14]))),
                ch_mult=[1, 2], attn_resolutions=[], resolution=32)
  for key in ("n_embed", "embed_dim", "z_channels", "num_res_blocks"):
    config[key] = draw(st.one_of(st.integers(1, 8), st.sampled_from([10**6, 2**31]))) if draw(st.booleans()) \
        else VQGAN_DICT[key]
  return VQGANConfig, FlaxVQGANModel, config


def _check_size_guard(config_cls, model_cls, config_dict) -> None:
  try:
    config = config_cls.from_dict(config_dict)
  except ValueError:
    return
  model = model_cls(config, _do_init=False)
  start = time.perf_counter()
  try:
    shapes = model.params_shape_tree
  except ValueError as e:  # sizes past what jax can shape: named, and refused by the guard too
    assert "cannot be built from this" in str(e)
    with pytest.raises(ValueError, match="cannot be built from this"):
      model._check_fits_in_memory()
    return
  need = sum(int(np.prod(leaf.shape, dtype=np.float64)) * 4 for leaf in jax.tree.leaves(shapes))
  fits = need <= modeling_flax_utils._memory_bytes()
  try:
    model._check_fits_in_memory()
  except ValueError as e:
    assert not fits and "more than this machine's memory" in str(e)
  else:
    assert fits
  assert time.perf_counter() - start < 20


@fuzz_settings(40, HealthCheck.function_scoped_fixture)
@given(_sized_configs())
def test_fuzz_absurd_sizes_are_refused_before_allocation(case):
  _check_size_guard(*case)


@pytest.mark.slow
@fuzz_settings(400, HealthCheck.function_scoped_fixture)
@given(_sized_configs())
def test_fuzz_absurd_sizes_are_refused_before_allocation_slow(case):
  _check_size_guard(*case)


def test_a_config_of_another_model_is_refused():
  """Found by the fuzzer: a VQGAN config.json read as a DalleBartConfig built a default DalleBart."""
  with pytest.raises(ValueError, match="model_type 'vqgan', but DalleBartConfig reads model_type 'dallebart'"):
    DalleBartConfig.from_dict(VQGAN_DICT)
  with pytest.raises(ValueError, match="model_type 'dallebart', but VQGANConfig reads"):
    VQGANConfig.from_dict(TEXT_DICT)
  # a pipeline folder's composite config yields the part each class owns
  assert DalleBartConfig.from_dict(PIPELINE_DICT).d_model == TEXT_DICT["d_model"]
  assert VQGANConfig.from_dict(PIPELINE_DICT).ch == VQGAN_DICT["ch"]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"image_length": -1}, "image_length must be a positive integer, got -1"),
        ({"encoder_layers": 0}, "encoder_layers must be a positive integer, got 0"),
        ({"dropout": float("nan")}, r"dropout must be a rate in \[0, 1\), got nan"),
        ({"init_std": float("inf")}, "init_std must be a finite number >= 0"),
        ({"decoder_start_token_id": 65}, "decoder_start_token_id must be a row of the decoder embedding"),
        ({"decoder_max_position_embeddings": 3}, "decoder_max_position_embeddings must be None or an integer >= "
                                                 "image_length=16"),
        ({"id2label": 5}, "invalid DalleBartConfig: 'int' object has no attribute 'items'"),
        ({"d_model": "64"}, "invalid DalleBartConfig: Validation error for field 'd_model'"),
    ],
)
def test_values_found_by_the_fuzzer_are_named(change, match):
  with pytest.raises(ValueError, match=match):
    DalleBartConfig.from_dict({**TEXT_DICT, **change})


def test_structural_counts_are_capped_so_a_build_cannot_hang():
  """Found by the fuzzer: num_res_blocks 10**6 traced for minutes (unbounded) before any size check."""
  with pytest.raises(ValueError, match="num_res_blocks must be at most 16"):
    VQGANConfig.from_dict({**VQGAN_DICT, "num_res_blocks": 10**6})
  with pytest.raises(ValueError, match=r"len\(ch_mult\) must be at most 12"):
    VQGANConfig.from_dict({**VQGAN_DICT, "ch_mult": [1] * 13, "resolution": 2**12, "attn_resolutions": []})
  with pytest.raises(ValueError, match="decoder_layers must be at most 256"):
    DalleBartConfig.from_dict({**TEXT_DICT, "decoder_layers": 257})


def test_sizes_jax_cannot_shape_are_a_value_error(tmp_path):
  """Found by the fuzzer: embed_dim 2**31 made tracing raise a TypeError from jax's reshape."""
  model = FlaxVQGANModel(VQGANConfig.from_dict({**VQGAN_DICT, "embed_dim": 2**31, "n_embed": 2**31}), _do_init=False)
  with pytest.raises(ValueError, match="FlaxVQGANModel cannot be built from this VQGANConfig"):
    model._check_fits_in_memory()


def test_unreadable_config_files_are_named(tmp_path):
  for content, error, match in [(b"null", ValueError, "could not read a DalleBartConfig from"),
                                (b"[" * 100_000, OSError, "nests too deeply"),
                                (b"[1, 2]", ValueError, "built from a JSON object")]:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(error, match=match):
      DalleBartConfig.from_pretrained(tmp_path)
    with pytest.raises((ValueError, OSError)):
      FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)
