"""DalleBartConfig: defaults of the original, legacy config.json files, validation errors."""

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, GenerationConfig

from dalle_flax import DalleBartConfig
from dalle_flax.convert import convert_bart2021_config

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
DALLEBART_FIXTURES = ["dallebart-mini-like", "dallebart-variant-swinv2", "dallebart-variant-cogview"]

# Reference §2.2: every flag of the original DalleBartConfig and its default.
ORIGINAL_DEFAULTS = {
    "normalize_text": False,
    "encoder_vocab_size": 50264,
    "image_vocab_size": 16384,
    "image_length": 256,
    "max_text_length": 64,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "d_model": 1024,
    "activation_function": "gelu",
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "init_std": 0.02,
    "scale_embedding": False,
    "gradient_checkpointing": True,
    "use_scan": True,  # None -> ln_positions != "swinv2"
    "use_cache": True,
    "tie_word_embeddings": False,
    "use_bias": False,
    "ln_type": "layernorm",
    "ln_positions": "normformer",
    "use_head_scale": False,
    "use_cosine_attention": False,
    "tau_init": 0.05,
    "use_absolute_position_embeddings": True,
    "use_swin_position_embeddings": False,
    "use_deepnet_scaling": False,
    "use_subln_init": False,
    "use_glu": True,
    "use_alibi": False,
    "sinkhorn_iters": 1,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
    "force_ln_scale": False,
    "decoder_start_token_id": 16384,  # image_vocab_size
    "bos_token_id": 16384,
    "pad_token_id": 16384,
    "eos_token_id": 16384,
    "is_encoder_decoder": True,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
}


def _fixture_config(name: str) -> dict:
  path = FIXTURES / name / "config.json"
  if not path.is_file():
    pytest.skip(f"golden fixtures not found at {FIXTURES} (they live in ../shared beside the checkout)")
  return json.loads(path.read_text())


def test_defaults_are_the_original_ones():
  config = DalleBartConfig()
  assert {k: getattr(config, k) for k in ORIGINAL_DEFAULTS} == ORIGINAL_DEFAULTS
  assert config.model_type == "dallebart"
  assert config.num_attention_heads == 16 and config.hidden_size == 1024  # the original attribute_map
  assert config.legacy_generation_kwargs == {"do_sample": True, "min_length": 257, "max_length": 257}
  # our additions default to the DalleBart behaviour
  assert config.position_embedding_offset == 0 and not config.use_final_logits_bias
  assert (config.encoder_positions, config.decoder_positions) == (64, 256)


def test_derived_defaults_follow_their_sources():
  config = DalleBartConfig(image_vocab_size=100, ln_positions="swinv2")
  assert config.use_scan is False
  assert (config.decoder_start_token_id, config.bos_token_id, config.pad_token_id) == (100, 100, 100)
  assert DalleBartConfig(ln_positions="deepnet").ln_positions == "postln"


@pytest.mark.parametrize("name", DALLEBART_FIXTURES)
def test_legacy_config_json_loads_unchanged(name, tmp_path):
  raw = _fixture_config(name)
  config = DalleBartConfig.from_pretrained(FIXTURES / name)
  for key, value in raw.items():
    if key in ("transformers_version", "min_length", "max_length", "do_sample"):
      continue
    assert getattr(config, key) == value, key
  assert config.architectures == ["eBart"]
  # generation keys that transformers 5.x pops from model configs stay available
  assert config.legacy_generation_kwargs == {"do_sample": True, "min_length": 17, "max_length": 17}
  assert DalleBartConfig.legacy_generation_kwargs_from_dict(raw) == {
      "do_sample": True, "min_length": 17, "max_length": 17}
  generation = GenerationConfig.from_model_config(config.legacy_generation_kwargs)
  assert (generation.max_length, generation.do_sample) == (17, True)
  # save -> load round trip keeps every value
  config.save_pretrained(tmp_path)
  reloaded = DalleBartConfig.from_pretrained(tmp_path).to_dict()
  assert {k: v for k, v in reloaded.items() if k != "_name_or_path"} == {
      k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_autoconfig_resolves_dallebart():
  path = FIXTURES / "dallebart-mini-like"
  if not path.is_dir():
    pytest.skip(f"golden fixtures not found at {FIXTURES}")
  assert isinstance(AutoConfig.from_pretrained(path), DalleBartConfig)
  assert isinstance(AutoConfig.for_model("dallebart", d_model=64, encoder_attention_heads=4,
                                         decoder_attention_heads=4), DalleBartConfig)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ln_positions": "sandwich"}, r"ln_positions='sandwich'.*normformer.*swinv2.*cogview.*postln.*preln.*subln"),
        ({"ln_type": "batchnorm"}, r"ln_type='batchnorm'.*'layernorm', 'rmsnorm'"),
        ({"use_alibi": True}, r"use_alibi=True is not implemented"),
        ({"ln_positions": "swinv2", "use_scan": True}, r"use_scan=True cannot be combined with ln_positions='swinv2'"),
        ({"activation_function": "gelu_42"}, r"activation_function='gelu_42'.*expected one of"),
        ({"d_model": 100, "encoder_attention_heads": 16}, r"d_model=100 must be a positive multiple of encoder_attention_heads=16"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings=True"),
        ({"sinkhorn_iters": 0}, r"sinkhorn_iters must be a positive integer, got 0"),
    ],
)
def test_invalid_values_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DalleBartConfig(**kwargs)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("d_model", "1024", r"d_model.*expected int, got str"),
        ("use_glu", "yes", r"use_glu.*expected bool, got str"),
        ("ln_positions", 3, r"ln_positions.*expected str, got int"),
    ],
)
def test_wrong_types_in_config_json_name_the_key(tmp_path, key, value, match):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "dallebart", key: value}))
  with pytest.raises(Exception, match=match):
    DalleBartConfig.from_pretrained(tmp_path)


def test_seed_config_converts_to_our_additions():
  raw = _fixture_config("bart2021-seed")
  config = convert_bart2021_config(raw)
  assert (config.ln_positions, config.use_bias, config.use_glu, config.force_ln_scale) == ("postln", True, False, True)
  assert (config.position_embedding_offset, config.use_final_logits_bias) == (2, True)
  assert (config.image_vocab_size, config.image_length, config.decoder_positions) == (64, 16, 17)
  assert (config.encoder_vocab_size, config.encoder_positions, config.max_text_length) == (1000, 32, 32)
  assert (config.decoder_start_token_id, config.eos_token_id, config.architectures) == (
      64, 65, ["omFlaxBartForConditionalGeneration"])
  assert config.legacy_generation_kwargs["max_length"] == 17
  assert config.legacy_generation_kwargs["forced_eos_token_id"] is None
