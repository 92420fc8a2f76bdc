"""DalleBart in Flax linen (DALL·E mini / mega): encoder, decoder, KV cache and the public model.

Example::

    model = FlaxDalleMiniForConditionalGeneration.from_pretrained("dalle-mini/dalle-mini")
    encoder_out = model.encode(input_ids, attention_mask)                  # (b, t, d)
    cache = model.init_cache(model.params, encoder_out, attention_mask)
    logits, cache = model.decode_step(model.params, start_tokens, jnp.int32(0), cache)

The parameter tree is the one of the released checkpoints (reference §2.9): scanned layers
under ``layers/FlaxBartEncoderLayers`` with a leading layer axis, or unscanned
``layers/FlaxBartEncoderLayer_{i}``. Incremental decoding uses an explicit
:class:`DecoderCache` of plain arrays; cross-attention keys/values are computed once by
``init_cache``. Every entry point is a method of :class:`DalleBartModule` usable with
``module.apply({"params": params}, ..., method="decode_step")`` and, on the model object, a
method taking ``params`` explicitly, so jitted code never closes over parameters.

Differences from the original, on purpose:
* ``use_swin_position_embeddings``: the learned bias is indexed by the actual query/key
  positions, so cached decoding equals teacher forcing (the original added the full
  ``image_length x image_length`` table and only matched teacher forcing at full length).
* ``ln_positions="postln"``/``"deepnet"`` runs (the original decoder crashed: no ``final_ln``).
"""

import dataclasses
import difflib
import functools
import logging
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from . import kernels
from .configuration_dalle_mini import DalleBartConfig
from .convert.bart2021 import convert_bart2021_config, convert_bart2021_params, is_bart2021_config, is_bart2021_params
from .convert.scan import is_scanned, scan_params, unscan_params
from .generation.utils import Decoding, GenerationMixin, as_ids, on_one_cpu_device
from .layers_dalle_mini import BlockSpec, DecoderStack, EncoderStack, StackSpec, make_norm
from .modeling_flax_utils import FlaxPreTrainedModel, flatten_params, unflatten_params

logger = logging.getLogger(__name__)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Static, hashable settings of the whole model (built from the config by :func:`model_spec`)."""

  encoder: BlockSpec
  decoder: BlockSpec
  encoder_layers: int
  decoder_layers: int
  encoder_vocab_size: int
  image_vocab_size: int
  encoder_positions: int
  decoder_positions: int
  position_offset: int
  use_absolute_position_embeddings: bool
  embed_scale: float
  ln_type: str
  ln_positions: str
  force_ln_scale: bool
  use_final_ln_encoder: bool
  use_final_ln_decoder: bool
  use_scan: bool
  gradient_checkpointing: bool
  use_final_logits_bias: bool
  init_std: float
  dropout: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general: Any = None  # the lm_head's product (see BlockSpec.dot_general)
  unrolled_decoder: bool = False  # decoder layers unrolled even when use_scan (generate's decoding view)

  @property
  def decoder_scanned(self) -> bool:
    return self.use_scan and not self.unrolled_decoder


def model_spec(config: Any, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> ModelSpec:
  """Resolves a :class:`~dalle_flax.DalleBartConfig` into the static :class:`ModelSpec`."""
  n, m = config.encoder_layers, config.decoder_layers
  enc_alpha = dec_alpha = 1.0
  enc_gain = dec_gain = dec_cross_gain = 1.0
  if config.use_deepnet_scaling:  # DeepNet (arXiv:2203.00555)
    enc_alpha, enc_gain = 0.81 * (n**4 * m) ** 0.0625, 0.87 * (n**4 * m) ** -0.0625
    dec_alpha, dec_gain = (3 * m) ** 0.25, (12 * m) ** -0.25
    dec_cross_gain = dec_gain
  elif config.use_subln_init:  # Magneto (arXiv:2210.06423); cross-attention keeps the plain init
    enc_gain = math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
    dec_gain = math.sqrt(math.log(3 * m))

  def block(side: str, alpha: float, gain: float, cross_gain: float) -> BlockSpec:
    encoder = side == "encoder"
    positions = config.encoder_positions if encoder else config.decoder_positions
    return BlockSpec(
        d_model=config.d_model,
        num_heads=getattr(config, f"{side}_attention_heads"),
        ffn_dim=getattr(config, f"{side}_ffn_dim"),
        ln_positions=config.ln_positions,
        ln_type=config.ln_type,
        use_bias=config.use_bias,
        use_glu=config.use_glu,
        activation=config.activation_function,
        use_head_scale=config.use_head_scale,
        use_cosine_attention=config.use_cosine_attention,
        tau=float(config.tau_init),
        use_swin_position_embeddings=config.use_swin_position_embeddings,
        force_ln_scale=config.force_ln_scale,
        dropout=float(config.dropout),
        attention_dropout=float(config.attention_dropout),
        activation_dropout=float(config.activation_dropout),
        init_std=float(config.init_std),
        residual_gain=alpha,
        attention_init_gain=gain,
        cross_attention_init_gain=cross_gain,
        ffn_init_gain=gain,
        sinkhorn_iters=config.sinkhorn_iters if encoder else 1,
        query_length=positions,
        key_length=positions,
        cross_key_length=config.encoder_positions,
        dtype=dtype,
        param_dtype=param_dtype,
    )

  return ModelSpec(
      encoder=block("encoder", enc_alpha, enc_gain, enc_gain),
      decoder=block("decoder", dec_alpha, dec_gain, dec_cross_gain),
      encoder_layers=n,
      decoder_layers=m,
      encoder_vocab_size=config.encoder_vocab_size,
      image_vocab_size=config.image_vocab_size,
      encoder_positions=config.encoder_positions,
      decoder_positions=config.decoder_positions,
      position_offset=config.position_embedding_offset,
      use_absolute_position_embeddings=config.use_absolute_position_embeddings,
      embed_scale=math.sqrt(config.d_model) if config.scale_embedding else 1.0,
      ln_type=config.ln_type,
      ln_positions=config.ln_positions,
      force_ln_scale=config.force_ln_scale,
      use_final_ln_encoder=config.use_final_ln_encoder,
      use_final_ln_decoder=config.use_final_ln_decoder,
      use_scan=bool(config.use_scan),
      gradient_checkpointing=config.gradient_checkpointing,
      use_final_logits_bias=config.use_final_logits_bias,
      init_std=float(config.init_std),
      dropout=float(config.dropout),
      dtype=dtype,
      param_dtype=param_dtype,
  )


@flax.struct.dataclass
class DecoderCache:
  """Decoder state for incremental decoding: plain arrays, a valid ``lax.scan`` carry.

  With scanned layers each field is stacked on a leading layer axis; with unrolled layers it
  is a tuple with one array per layer, so a step reads and updates each layer's cache in place
  (slicing a stacked cache made XLA copy every layer's slice at every step: a mini step at
  batch 8 spent more time copying the cache than in attention). Keys are stored as the
  attention uses them (L2-normalised when ``use_cosine_attention``).

  Attributes:
    self_key / self_value: (layers, b, heads, decoder_positions, head_dim) or a tuple of
      ``layers`` (b, heads, decoder_positions, head_dim) arrays; slot p holds the keys/values
      of decoder position p once it has been decoded. Heads come before positions so that
      attention reads the cache in place (no per-step transpose).
    cross_key / cross_value: (layers, b, heads, t, head_dim) or a per-layer tuple, from the
      encoder output.
    text_mask: (b, t) bool, True for real text tokens.
    length: () int32, number of decoder positions written (the next position to decode).
  """

  self_key: Array | tuple[Array, ...]
  self_value: Array | tuple[Array, ...]
  cross_key: Array | tuple[Array, ...]
  cross_value: Array | tuple[Array, ...]
  text_mask: Array
  length: Array

  @property
  def num_positions(self) -> int:
    """Decoder positions the cache holds."""
    return self.self_key[0].shape[2]  # layer 0 of a stack or of a tuple: (b, h, positions, hd)


@flax.struct.dataclass
class DalleBartOutput:
  """Teacher-forced forward output.

  Attributes:
    logits: (b, n, image_vocab_size + 1).
    encoder_last_hidden_state: (b, t, d_model).
  """

  logits: Array
  encoder_last_hidden_state: Array


def _key_mask(mask: Array) -> Array:
  return mask.astype(bool)[:, None, None, :]  # (b, 1, 1, t)


class Encoder(nn.Module):
  """Text encoder: token + position embeddings, layernorm_embedding, layers, final_ln."""

  spec: ModelSpec
  deterministic: bool = True

  def setup(self) -> None:
    spec = self.spec
    init = jax.nn.initializers.normal(spec.init_std)
    d = spec.encoder.d_model
    self.embed_tokens = nn.Embed(spec.encoder_vocab_size, d, embedding_init=init, dtype=spec.dtype,
                                 param_dtype=spec.param_dtype)
    if spec.use_absolute_position_embeddings:
      self.embed_positions = nn.Embed(spec.encoder_positions + spec.position_offset, d, embedding_init=init,
                                      dtype=spec.dtype, param_dtype=spec.param_dtype)
    self.layernorm_embedding = make_norm(spec.ln_type, True, None, spec.dtype, spec.param_dtype)
    self.layers = EncoderStack(StackSpec(spec.encoder, spec.encoder_layers, spec.use_scan,
                                         spec.gradient_checkpointing), self.deterministic)
    if spec.use_final_ln_encoder and spec.ln_positions != "postln":  # postln ends each layer with a norm
      self.final_ln = make_norm(spec.ln_type, spec.force_ln_scale, None, spec.dtype, spec.param_dtype)
    self.dropout_layer = nn.Dropout(spec.dropout)

  def __call__(self, input_ids: Array, attention_mask: Array) -> Array:
    """(b, t) ids and mask -> (b, t, d) encoder states."""
    x = self.embed_tokens(input_ids) * self.spec.embed_scale  # (b, t, d)
    if self.spec.use_absolute_position_embeddings:
      x = x + self.embed_positions(jnp.arange(input_ids.shape[1]) + self.spec.position_offset)
    x = self.dropout_layer(self.layernorm_embedding(x), deterministic=self.deterministic)
    x = self.layers(x, _key_mask(attention_mask))
    return self.final_ln(x) if hasattr(self, "final_ln") else x


class Decoder(nn.Module):
  """Image-token decoder: embeddings, layers, final_ln (hidden states; lm_head is outside)."""

  spec: ModelSpec
  deterministic: bool = True

  def setup(self) -> None:
    spec = self.spec
    init = jax.nn.initializers.normal(spec.init_std)
    d = spec.decoder.d_model
    self.embed_tokens = nn.Embed(spec.image_vocab_size + 1, d, embedding_init=init, dtype=spec.dtype,
                                 param_dtype=spec.param_dtype)
    if spec.use_absolute_position_embeddings:
      self.embed_positions = nn.Embed(spec.decoder_positions + spec.position_offset, d, embedding_init=init,
                                      dtype=spec.dtype, param_dtype=spec.param_dtype)
    self.layernorm_embedding = make_norm(spec.ln_type, True, None, spec.dtype, spec.param_dtype)
    self.layers = DecoderStack(StackSpec(spec.decoder, spec.decoder_layers, spec.decoder_scanned,
                                         spec.gradient_checkpointing), self.deterministic)
    if spec.use_final_ln_decoder and spec.ln_positions != "postln":
      self.final_ln = make_norm(spec.ln_type, spec.force_ln_scale, None, spec.dtype, spec.param_dtype)
    self.dropout_layer = nn.Dropout(spec.dropout)

  def _embed(self, ids: Array, positions: Array) -> Array:
    x = self.embed_tokens(ids) * self.spec.embed_scale  # (b, n, d)
    if self.spec.use_absolute_position_embeddings:
      x = x + self.embed_positions(positions + self.spec.position_offset)
    return self.dropout_layer(self.layernorm_embedding(x), deterministic=self.deterministic)

  def _final(self, x: Array) -> Array:
    return self.final_ln(x) if hasattr(self, "final_ln") else x

  def __call__(self, ids: Array, encoder_out: Array, text_mask: Array, self_mask: Array | None) -> Array:
    """Teacher forcing from position 0: (b, n) ids -> (b, n, d) hidden states."""
    positions = jnp.arange(ids.shape[1])
    self_mask = None if self_mask is None else _key_mask(self_mask)
    x = self.layers(self._embed(ids, positions), encoder_out, _key_mask(text_mask), self_mask, positions)
    return self._final(x)

  def cross_kv(self, encoder_out: Array) -> tuple[Array, Array]:
    """(b, t, d) -> cross-attention keys, values (layers, b, h, t, hd)."""
    return self.layers.cross_kv(encoder_out)

  def cached(self, ids: Array, position: Array, cache: DecoderCache) -> tuple[Array, Array, Array]:
    """A chunk of c tokens at positions ``position + arange(c)`` against the cache.

    Returns:
      hidden states (b, c, d) and the updated self-attention cache keys, values (stacked
      (layers, b, h, positions, hd) when scanned, else per-layer tuples).
    """
    x = self._embed(ids, position + jnp.arange(ids.shape[1]))
    x, (keys, values) = self.layers.cached(x, cache.self_key, cache.self_value, cache.cross_key,
                                           cache.cross_value, _key_mask(cache.text_mask), position)
    return self._final(x), keys, values


class BartModel(nn.Module):
  """Holds ``encoder`` and ``decoder`` (the ``model/`` scope of the checkpoints)."""

  spec: ModelSpec
  deterministic: bool = True

  def setup(self) -> None:
    self.encoder = Encoder(self.spec, self.deterministic)
    self.decoder = Decoder(self.spec, self.deterministic)


class DalleBartModule(nn.Module):
  """DalleBart: text ids -> encoder states -> image-token logits (``image_vocab_size + 1``).

  Entry points (all usable with ``module.apply(variables, ..., method=name)``):
  ``__call__`` (teacher forcing), ``encode``, ``decode``, ``init_cache``, ``decode_chunk``,
  ``decode_step``. Logits are in the compute dtype.
  """

  spec: ModelSpec
  deterministic: bool = True

  def setup(self) -> None:
    spec = self.spec
    self.model = BartModel(spec, self.deterministic)
    self.lm_head = nn.Dense(spec.image_vocab_size + 1, use_bias=False, dtype=spec.dtype,
                            param_dtype=spec.param_dtype, dot_general=spec.dot_general,
                            kernel_init=jax.nn.initializers.normal(spec.init_std))
    if spec.use_final_logits_bias:  # 2021 seed model
      self.final_logits_bias = self.param("final_logits_bias", jax.nn.initializers.zeros,
                                          (1, spec.image_vocab_size + 1), spec.param_dtype)

  def _logits(self, hidden: Array) -> Array:
    logits = self.lm_head(hidden)  # (b, n, v)
    if self.spec.use_final_logits_bias:
      logits = logits + self.final_logits_bias.astype(logits.dtype)
    return logits

  def __call__(self, input_ids: Array, attention_mask: Array, decoder_input_ids: Array,
               decoder_attention_mask: Array | None = None) -> DalleBartOutput:
    encoder_out = self.encode(input_ids, attention_mask)
    logits = self.decode(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask)
    return DalleBartOutput(logits=logits, encoder_last_hidden_state=encoder_out)

  def encode(self, input_ids: Array, attention_mask: Array) -> Array:
    """(b, t) int ids, (b, t) mask -> (b, t, d) encoder output."""
    return self.model.encoder(input_ids, attention_mask)

  def decode(self, decoder_input_ids: Array, encoder_out: Array, attention_mask: Array,
             decoder_attention_mask: Array | None = None) -> Array:
    """Teacher forcing from position 0: (b, n) ids -> (b, n, v) logits."""
    hidden = self.model.decoder(decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask)
    return self._logits(hidden)

  def init_cache(self, encoder_out: Array, attention_mask: Array) -> DecoderCache:
    """Empty self-attention cache and cross-attention keys/values computed once."""
    spec = self.spec.decoder
    cross_key, cross_value = self.model.decoder.cross_kv(encoder_out)
    shape = (self.spec.decoder_layers, encoder_out.shape[0], spec.num_heads, self.spec.decoder_positions,
             spec.head_dim)
    self_key, self_value = jnp.zeros(shape, cross_key.dtype), jnp.zeros(shape, cross_value.dtype)
    if not self.spec.decoder_scanned:  # one array per layer (see DecoderCache)
      self_key, self_value, cross_key, cross_value = (
          tuple(a[i] for i in range(a.shape[0])) for a in (self_key, self_value, cross_key, cross_value))
    return DecoderCache(
        self_key=self_key,
        self_value=self_value,
        cross_key=cross_key,
        cross_value=cross_value,
        text_mask=attention_mask.astype(bool),
        length=jnp.zeros((), jnp.int32),
    )

  def decode_chunk(self, tokens: Array, position: Array, cache: DecoderCache) -> tuple[Array, DecoderCache]:
    """Decodes c tokens at positions ``position .. position + c - 1`` and writes them to the cache.

    Args:
      tokens: (b, c) int32 decoder input ids.
      position: () int32, may be traced; ``position + c`` must not exceed the cache length.
      cache: from :meth:`init_cache` (or a previous step).

    Returns:
      logits (b, c, v) and the updated cache (``length = position + c``).
    """
    position = jnp.asarray(position, jnp.int32)
    hidden, keys, values = self.model.decoder.cached(tokens, position, cache)
    # the layers wrote the chunk into their caches: stacked when scanned, per-layer tuples if not
    cache = cache.replace(self_key=keys, self_value=values, length=position + tokens.shape[1])
    return self._logits(hidden), cache

  def decode_step(self, token: Array, position: Array, cache: DecoderCache) -> tuple[Array, DecoderCache]:
    """One token per row: (b,) ids at scalar ``position`` -> logits (b, v) and updated cache."""
    logits, cache = self.decode_chunk(token[:, None], position, cache)
    return logits[:, 0], cache


# ============================================================================ public model
@functools.lru_cache(maxsize=64)
def _jitted_apply(module: DalleBartModule, method: str) -> Any:
  """One jitted ``module.apply(..., method=method)``; modules are hashable, so equal configs share it."""
  return jax.jit(lambda params, rngs, *args: module.apply({"params": params}, *args, method=method, rngs=rngs))


@functools.lru_cache(maxsize=64)
def _native_module(module: DalleBartModule) -> DalleBartModule:
  """Inference ``module`` with the native CPU kernels in its decoder: :func:`~dalle_flax.kernels.
  small_batch_dot_general` in the Dense layers and the lm_head, :func:`~dalle_flax.kernels.
  one_query_attention` for a step's attention (the encoder runs through ``encode``, never here)."""
  dot = kernels.small_batch_dot_general
  decoder = dataclasses.replace(module.spec.decoder, dot_general=dot, one_query_attention=kernels.one_query_attention)
  spec = dataclasses.replace(module.spec, decoder=decoder, dot_general=dot)
  return DalleBartModule(spec, deterministic=True)


@functools.lru_cache(maxsize=64)
def _unrolled_module(module: DalleBartModule) -> DalleBartModule:
  """``module`` with its decoder layers unrolled (parameters ``FlaxBartDecoderLayer_{i}``): the
  decoding view of a scanned model (see ``_decoding_params``)."""
  return DalleBartModule(dataclasses.replace(module.spec, unrolled_decoder=True), deterministic=module.deterministic)


@dataclasses.dataclass(frozen=True)
class ModuleMethod:
  """``module.apply({"params": params}, *args, method=method)``, jitted, as a plain function.

  Hashable and free of parameters, so the generation loop takes it as a static argument without
  its jit cache keeping a model (and its parameters) alive.
  """

  module: DalleBartModule
  method: str

  def __call__(self, params: Any, *args: Any) -> Any:
    return _jitted_apply(self.module, self.method)(params, None, *args)


class FlaxDalleMiniForConditionalGeneration(GenerationMixin, FlaxPreTrainedModel):
  """DALL·E mini / mega text-to-image-token model (``DalleBart``), Flax.

  ``params`` is the nested dict of the released checkpoints. Every method that computes takes
  ``params`` explicitly (None means ``self.params``), so it can be jitted without closing over
  them. ``model.module`` (a hashable :class:`DalleBartModule`) exposes the same entry points
  for ``module.apply``.

  Incremental decoding (the contract of the generation loop)::

      cache = model.init_cache(params, encoder_out, text_mask)       # DecoderCache
      logits, cache = model.decode_step(params, token, position, cache)   # (b, v)

  ``position`` is a traced int32 scalar; ``token`` is the (b,) input at that position (the
  start token at position 0). ``decode_chunk`` does the same for c tokens at once.
  """

  config_class = DalleBartConfig
  main_input_name = "input_ids"
  model_card_template = "dallebart.md"

  # --- construction --------------------------------------------------------------------------
  def build_module(self) -> DalleBartModule:
    return DalleBartModule(model_spec(self.config, self.dtype, self.param_dtype))

  def init_weights(self, key: Array) -> dict[str, Any]:
    ids = jnp.zeros((1, 1), jnp.int32)
    return self.module.init(key, ids, jnp.ones_like(ids), ids)["params"]

  @classmethod
  def config_from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DalleBartConfig:
    """Reads DalleBart configs as they are and 2021 seed configs through ``convert_bart2021_config``."""
    known = {f.name for f in dataclasses.fields(DalleBartConfig)} | set(DalleBartConfig.attribute_map)
    unknown = sorted(set(kwargs) - known)
    if unknown:
      hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
      raise TypeError(
          f"unknown DalleBartConfig key(s) {unknown} passed to from_pretrained"
          + "".join(f"; did you mean {h[0]!r} for {k!r}?" for k, h in hints.items() if h)
      )
    model_type = config_dict.get("model_type", "dallebart")
    if model_type == "dalle-mini" and isinstance(config_dict.get("text_config"), dict):
      # a single-folder pipeline: the text model's weights sit next to the composite config
      config_dict, model_type = config_dict["text_config"], config_dict["text_config"].get("model_type", "dallebart")
    if is_bart2021_config(config_dict):
      return convert_bart2021_config(config_dict, **kwargs)
    if model_type != DalleBartConfig.model_type:
      raise ValueError(
          f"config.json has model_type {model_type!r}; {cls.__name__} loads 'dallebart' checkpoints "
          "(and 'bart' for the 2021 seed model). Use the model class matching this checkpoint."
      )
    return DalleBartConfig.from_dict({**config_dict, **kwargs})

  @classmethod
  def convert_checkpoint_params(cls, flat: dict[str, Any], config: DalleBartConfig) -> dict[str, Any]:
    """Seed tree -> DalleBart tree, then scanned <-> unscanned to match ``config.use_scan``."""
    if is_bart2021_params(flat):
      flat = convert_bart2021_params(flat)
    scanned = is_scanned(flat)
    if scanned is False and config.use_scan:
      flat = scan_params(flat)
    elif scanned and not config.use_scan:
      flat = unscan_params(flat)
      if config.ln_positions == "postln" and not config.force_ln_scale:
        flat = _drop_last_layer_unit_scale(flat, config)
    return flat

  def _apply(self, params: Any, *args: Any, method: str, train: bool = False, dropout_rng: Array | None = None,
             native: bool = False) -> Any:
    """``module.apply`` of one entry point, jitted (shared by every model with the same module).

    ``native=True`` runs the module with the native CPU kernels in its decoder (see ``_native_module``).
    """
    if train and dropout_rng is None and self.config.dropout > 0:
      raise ValueError("train=True applies dropout and needs dropout_rng=jax.random.key(...)")
    rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
    module = self.module.clone(deterministic=not train)
    if native:
      module = _native_module(module)
    return _jitted_apply(module, method)(self._require_params(params), rngs, *args)

  # --- generate()'s decoding view of a scanned model ------------------------------------------
  def _decoding_params(self, params: Any) -> tuple[Any, bool]:
    """Parameters for incremental decoding, and whether the decoder layers were unrolled.

    A scanned (stacked) decoder makes XLA slice every layer's weights out of the stack at each
    decode step, which copies them (about 3x slower on CPU). For a scanned model this splits the
    decoder stack per layer once per ``generate`` call (the encoder stays as it is); the loop then
    runs the module with its decoder unrolled (see :meth:`decoding`). Same numbers. Unscanned
    models, and postln decoders whose last end-of-layer norm scale is not all ones (the unrolled
    layout has no scale there), keep their parameters.
    """
    params = self._require_params(params)
    if not self.module.spec.use_scan:
      return params, False
    flat = flatten_params(params)
    stack = "model/decoder/layers/FlaxBartDecoderLayers/"
    stacked = {k: v for k, v in flat.items() if k.startswith(stack)}
    if not stacked:
      return params, False
    layers = unscan_params(stacked)
    if self.config.ln_positions == "postln" and not self.config.force_ln_scale:
      try:
        layers = _drop_last_layer_unit_scale(layers, self.config)
      except ValueError:
        return params, False
    rest = {k: v for k, v in flat.items() if not k.startswith(stack)}
    return unflatten_params({**rest, **layers}), True

  def decoding(self, params: Any = None) -> Decoding:
    """What ``generate`` decodes with: the decoder split per layer for a scanned model (see
    :meth:`_decoding_params`), and the native CPU kernels in the decode step when every parameter
    sits on one CPU device and they build (see :mod:`dalle_flax.kernels`)."""
    params = self._require_params(params)
    loop_params, unrolled = self._decoding_params(params)
    if self.module.spec.use_scan and not unrolled and not getattr(self, "_warned_scan", False):
      self._warned_scan = True
      logger.warning("Generating with scanned (stacked) decoder layers, which slices every layer's weights "
                     "out of the stack at each step (about 3x slower on CPU); load with from_pretrained(..., "
                     "use_scan=False) for inference: see the README's performance section.")
    module = self.module.clone(deterministic=True)
    module = _unrolled_module(module) if unrolled else module
    native = on_one_cpu_device(params) and kernels.kernels_available()
    step_module = _native_module(module) if native else module
    return Decoding(loop_params, ModuleMethod(module, "init_cache"), ModuleMethod(step_module, "decode_step"),
                    native=native)

  def native_decode_step(self, params: Any, token: Array, position: Array,
                         cache: DecoderCache) -> tuple[Array, DecoderCache]:
    """:meth:`decode_step` with the native CPU kernels: the small-batch matmul in every Dense
    layer and the one-query attention over the cache and the text.

    Same parameters and results up to float32 rounding; ``generate`` uses it on a single CPU
    device when :func:`dalle_flax.kernels.kernels_available` (see that module).
    """
    return self._apply(params, token, position, cache, method="decode_step", native=True)

  def _check_lengths(self, input_ids: Array | None, decoder_ids: Array | None) -> None:
    config = self.config
    if input_ids is not None and input_ids.shape[1] > config.encoder_positions:
      raise ValueError(
          f"input_ids has length {input_ids.shape[1]} but the model has {config.encoder_positions} text "
          f"positions (max_text_length={config.max_text_length}); tokenize with DalleMiniProcessor"
      )
    if decoder_ids is not None and decoder_ids.shape[1] > config.decoder_positions:
      raise ValueError(
          f"decoder_input_ids has length {decoder_ids.shape[1]} but the decoder has {config.decoder_positions} "
          f"positions (image_length={config.image_length})"
      )

  # --- forward -------------------------------------------------------------------------------
  def __call__(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None,
               decoder_attention_mask: Any = None, params: Any = None, *, train: bool = False,
               dropout_rng: Array | None = None) -> DalleBartOutput:
    """Teacher-forced logits.

    Args:
      input_ids: (b, t) text ids; attention_mask: (b, t), default all ones.
      decoder_input_ids: (b, n) image ids starting with ``decoder_start_token_id`` (training:
        ``[start] + labels[:-1]``). None means the start token alone (first-step logits).
      decoder_attention_mask: (b, n) key padding of the decoder, default all ones.
      params: parameters (default ``self.params``); train / dropout_rng: enable dropout.

    Returns:
      ``DalleBartOutput`` with ``logits`` (b, n, image_vocab_size + 1) and
      ``encoder_last_hidden_state`` (b, t, d).
    """
    input_ids = as_ids("input_ids", input_ids)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else as_ids("attention_mask", attention_mask)
    if decoder_input_ids is None:
      decoder_input_ids = jnp.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, jnp.int32)
    decoder_input_ids = as_ids("decoder_input_ids", decoder_input_ids)
    self._check_lengths(input_ids, decoder_input_ids)
    return self._apply(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                       method="__call__", train=train, dropout_rng=dropout_rng)

  def encode(self, input_ids: Any, attention_mask: Any = None, params: Any = None, *, train: bool = False,
             dropout_rng: Array | None = None) -> Array:
    """(b, t) text ids and mask -> (b, t, d_model) encoder output."""
    input_ids = as_ids("input_ids", input_ids)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else as_ids("attention_mask", attention_mask)
    self._check_lengths(input_ids, None)
    return self._apply(params, input_ids, attention_mask, method="encode", train=train, dropout_rng=dropout_rng)

  def decode(self, decoder_input_ids: Any, encoder_hidden_states: Array | None = None, attention_mask: Any = None,
             decoder_attention_mask: Any = None, params: Any = None, cache: DecoderCache | None = None,
             position: Any = None) -> tuple[Array, DecoderCache | None]:
    """Decoder logits, teacher-forced from position 0 or continuing a cache.

    Args:
      decoder_input_ids: (b, n) image ids.
      encoder_hidden_states: (b, t, d) from :meth:`encode` (not needed with ``cache``).
      attention_mask: (b, t) text mask, default all ones (not needed with ``cache``).
      decoder_attention_mask: (b, n) decoder key padding (teacher forcing only).
      params: parameters (default ``self.params``).
      cache: a :class:`DecoderCache`; the n tokens are decoded at ``position`` (default
        ``cache.length``) and written into the returned cache.

    Returns:
      logits (b, n, image_vocab_size + 1) and the new cache (None without ``cache``).
    """
    decoder_input_ids = as_ids("decoder_input_ids", decoder_input_ids)
    if cache is not None:
      if decoder_attention_mask is not None:
        raise ValueError("decoder_attention_mask is only supported without cache (teacher forcing)")
      position = cache.length if position is None else position
      return self.decode_chunk(params, decoder_input_ids, position, cache)
    if encoder_hidden_states is None:
      raise ValueError("decode needs encoder_hidden_states (from model.encode) when no cache is given")
    self._check_lengths(None, decoder_input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
    logits = self._apply(params, decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask,
                         method="decode")
    return logits, None

  # --- incremental decoding (jit- and lax.scan-friendly) -------------------------------------
  def init_cache(self, params: Any, encoder_out: Array, text_mask: Any = None) -> DecoderCache:
    """Builds the decoder cache for ``encoder_out`` (b, t, d) and its (b, t) text mask."""
    if text_mask is None:
      text_mask = jnp.ones(encoder_out.shape[:2], jnp.int32)
    return self._apply(params, encoder_out, text_mask, method="init_cache")

  def decode_step(self, params: Any, token: Array, position: Array, cache: DecoderCache) -> tuple[Array, DecoderCache]:
    """(b,) tokens at scalar ``position`` -> logits (b, image_vocab_size + 1), updated cache."""
    return self._apply(params, token, position, cache, method="decode_step")

  def decode_chunk(self, params: Any, tokens: Array, position: Array,
                   cache: DecoderCache) -> tuple[Array, DecoderCache]:
    """(b, c) tokens at positions ``position .. position + c - 1`` -> logits (b, c, v), cache."""
    try:
      start = int(position)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
      start = None  # traced inside the caller's jit: no check possible
    if start is not None and not 0 <= start <= cache.num_positions - tokens.shape[1]:
      raise ValueError(
          f"cannot decode {tokens.shape[1]} token(s) at position {start}: the cache holds "
          f"{cache.num_positions} positions"
      )
    return self._apply(params, tokens, position, cache, method="decode_chunk")


def _drop_last_layer_unit_scale(flat: dict[str, Any], config: DalleBartConfig) -> dict[str, Any]:
  """Unrolled postln layers have no end-norm scale in the last layer: drop it if it is all ones."""
  prefix = "RMSNorm" if config.ln_type == "rmsnorm" else "LayerNorm"
  for side, layers, norm_index in (("encoder", config.encoder_layers, 1), ("decoder", config.decoder_layers, 2)):
    stack = "FlaxBartEncoderLayer" if side == "encoder" else "FlaxBartDecoderLayer"
    key = f"model/{side}/layers/{stack}_{layers - 1}/{prefix}_{norm_index}/scale"
    if key in flat:
      if not bool(jnp.all(jnp.asarray(flat[key]) == 1)):
        raise ValueError(
            f"{key} is not all ones, but an unscanned postln model has no scale there; load this "
            "checkpoint with use_scan=True or force_ln_scale=True"
        )
      del flat[key]
  return flat
