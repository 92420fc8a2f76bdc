"""The July-2021 seed model (``flax-community/dalle-mini``, model_type "bart") as a DalleBart.

Example::

    config = convert_bart2021_config(json.load(open("config.json")))
    flat = convert_bart2021_params(flatten_params(msgpack_restore(data)))

The seed is a post-LN BART (reference §3): biases everywhere, ``layernorm_embedding``, no
final norms, BART's position offset of 2 in both position tables, a separate decoder token
embedding ``model/decoder_embed`` and ``final_logits_bias``. Each of these maps onto a
DalleBart option (``ln_positions="postln"``, ``use_bias``, ``use_glu=False``,
``force_ln_scale``, ``position_embedding_offset=2``, ``use_final_logits_bias``), so the seed
runs in the same classes with renamed (never recomputed) parameters:

=====================================================  =================================================
seed                                                   DalleBart (unscanned)
=====================================================  =================================================
model/shared/embedding                                 model/encoder/embed_tokens/embedding
model/decoder_embed/embedding                          model/decoder/embed_tokens/embedding
model/encoder/layers/{i}/self_attn/*                   model/encoder/layers/FlaxBartEncoderLayer_{i}/FlaxBartAttention_0/*
model/encoder/layers/{i}/self_attn_layer_norm/*        .../FlaxBartEncoderLayer_{i}/LayerNorm_0/*
model/encoder/layers/{i}/fc1/*, fc2/*                  .../FlaxBartEncoderLayer_{i}/FFN_0/Dense_0/*, Dense_1/*
model/encoder/layers/{i}/final_layer_norm/*            .../FlaxBartEncoderLayer_{i}/LayerNorm_1/*
model/decoder/layers/{i}/self_attn/*                   .../FlaxBartDecoderLayer_{i}/FlaxBartAttention_0/*
model/decoder/layers/{i}/self_attn_layer_norm/*        .../FlaxBartDecoderLayer_{i}/LayerNorm_0/*
model/decoder/layers/{i}/encoder_attn/*                .../FlaxBartDecoderLayer_{i}/FlaxBartAttention_1/*
model/decoder/layers/{i}/encoder_attn_layer_norm/*     .../FlaxBartDecoderLayer_{i}/LayerNorm_1/*
model/decoder/layers/{i}/fc1/*, fc2/*                  .../FlaxBartDecoderLayer_{i}/FFN_0/Dense_0/*, Dense_1/*
model/decoder/layers/{i}/final_layer_norm/*            .../FlaxBartDecoderLayer_{i}/LayerNorm_2/*
=====================================================  =================================================

Everything else (``lm_head``, ``final_logits_bias``, position tables, ``layernorm_embedding``)
keeps its path.
"""

import re
from collections.abc import Mapping
from typing import Any

from ..configuration_dalle_mini import DalleBartConfig

__all__ = ["convert_bart2021_config", "convert_bart2021_params", "is_bart2021_config", "is_bart2021_params"]

# The July-2021 app and notebook padded prompts to 128 tokens.
SEED_MAX_TEXT_LENGTH = 128

_LAYER = re.compile(r"^model/(?P<side>encoder|decoder)/layers/(?P<index>\d+)/(?P<module>[a-z_0-9]+)/(?P<rest>.+)$")
_LAYER_MODULES = {
    "encoder": {
        "self_attn": "FlaxBartAttention_0",
        "self_attn_layer_norm": "LayerNorm_0",
        "fc1": "FFN_0/Dense_0",
        "fc2": "FFN_0/Dense_1",
        "final_layer_norm": "LayerNorm_1",
    },
    "decoder": {
        "self_attn": "FlaxBartAttention_0",
        "self_attn_layer_norm": "LayerNorm_0",
        "encoder_attn": "FlaxBartAttention_1",
        "encoder_attn_layer_norm": "LayerNorm_1",
        "fc1": "FFN_0/Dense_0",
        "fc2": "FFN_0/Dense_1",
        "final_layer_norm": "LayerNorm_2",
    },
}
_RENAMES = {
    "model/shared/embedding": "model/encoder/embed_tokens/embedding",
    "model/decoder_embed/embedding": "model/decoder/embed_tokens/embedding",
}
# Architecture keys of BartConfig copied as they are.
_COPIED = (
    "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
    "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout", "attention_dropout",
    "activation_dropout", "init_std", "scale_embedding", "encoder_layerdrop", "decoder_layerdrop",
    "decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "architectures",
)
# BartConfig defaults (transformers 4.x) for keys a seed config.json may omit.
_BART_DEFAULTS = {
    "vocab_size": 50265, "max_position_embeddings": 1024, "d_model": 1024, "encoder_layers": 12,
    "decoder_layers": 12, "encoder_attention_heads": 16, "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096, "activation_function": "gelu", "dropout": 0.1,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "init_std": 0.02, "scale_embedding": False,
    # set by the seed's module setup() when absent
    "vocab_size_output": 16385, "max_position_embeddings_decoder": 257,
}


def is_bart2021_config(config_dict: Mapping[str, Any]) -> bool:
  """True for a seed ``config.json`` (BART model_type)."""
  return config_dict.get("model_type") == "bart"


def is_bart2021_params(flat: Mapping[str, Any]) -> bool:
  """True for a seed parameter tree (``model/shared`` / ``model/decoder_embed`` / numbered layers)."""
  return any(k in _RENAMES or _LAYER.match(k) for k in flat)


def convert_bart2021_config(raw_config_dict: Mapping[str, Any], **overrides: Any) -> DalleBartConfig:
  """Builds the DalleBart config that runs a seed checkpoint.

  Args:
    raw_config_dict: the seed's ``config.json`` (a transformers 4.x ``BartConfig`` dict plus
      ``vocab_size_output`` and ``max_position_embeddings_decoder``).
    **overrides: DalleBartConfig keys to set on top (e.g. ``use_scan=True``).

  Returns:
    A DalleBartConfig with ``image_vocab_size = vocab_size_output - 1``, ``image_length =
    max_position_embeddings_decoder - 1`` and the seed's architecture options. Generation
    keys of the raw dict are kept in ``legacy_generation_kwargs``.
  """
  raw = {**_BART_DEFAULTS, **{k: v for k, v in raw_config_dict.items() if v is not None}}
  if raw.get("model_type", "bart") != "bart":
    raise ValueError(f"expected a seed config with model_type 'bart', got {raw['model_type']!r}")
  kwargs: dict[str, Any] = {k: raw[k] for k in _COPIED if k in raw}
  kwargs.update(DalleBartConfig.legacy_generation_kwargs_from_dict(raw_config_dict))
  decoder_positions = int(raw["max_position_embeddings_decoder"])
  kwargs.update(
      encoder_vocab_size=int(raw["vocab_size"]),
      image_vocab_size=int(raw["vocab_size_output"]) - 1,
      image_length=decoder_positions - 1,  # generation length without the start token
      max_text_length=min(SEED_MAX_TEXT_LENGTH, int(raw["max_position_embeddings"])),
      encoder_max_position_embeddings=int(raw["max_position_embeddings"]),
      decoder_max_position_embeddings=decoder_positions,
      position_embedding_offset=2,
      use_final_logits_bias=True,
      ln_positions="postln",
      ln_type="layernorm",
      use_bias=True,
      use_glu=False,
      force_ln_scale=True,  # BART's last-layer norms have a scale
      use_final_ln_encoder=False,
      use_final_ln_decoder=False,
      use_absolute_position_embeddings=True,
      normalize_text=False,
      tie_word_embeddings=False,
      use_scan=False,
      gradient_checkpointing=False,
  )
  kwargs.update(overrides)
  return DalleBartConfig(**kwargs)


def convert_bart2021_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Renames a flat seed tree (``"/"``-joined keys) to the unscanned DalleBart tree.

  Raises:
    ValueError: a key the seed layout does not have (listing all of them).
  """
  out: dict[str, Any] = {}
  unknown = []
  for key, value in flat.items():
    match = _LAYER.match(key)
    if match is not None:
      module = _LAYER_MODULES[match["side"]].get(match["module"])
      if module is None:
        unknown.append(key)
        continue
      layer = "FlaxBartEncoderLayer" if match["side"] == "encoder" else "FlaxBartDecoderLayer"
      out[f"model/{match['side']}/layers/{layer}_{match['index']}/{module}/{match['rest']}"] = value
    else:
      out[_RENAMES.get(key, key)] = value
  if unknown:
    raise ValueError(f"unexpected parameters in the 2021 seed checkpoint: {sorted(unknown)}")
  return out
