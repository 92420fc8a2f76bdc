"""Linen building blocks of DalleBart: norms, attention, feed-forward, encoder and decoder layers.

Example::

  spec = BlockSpec(d_model=64, num_heads=4, ffn_dim=128, ...)
  layer = EncoderLayer(spec, name="FlaxBartEncoderLayer_0")

Layers take plain values (a frozen, hashable :class:`BlockSpec`), never the config. Every
module that owns checkpoint parameters gets the explicit name the original code gave it by
auto-naming (``LayerNorm_0``, ``FlaxBartAttention_1``, ``GLU_0/Dense_2``...), so released
``flax_model.msgpack`` trees load without renaming. Norms are named in creation order per
scope, counting param-less RMSNorms too (they consume an index but own no parameter), exactly
as flax auto-naming did in the original.

Norm placement (reference §2.4): ``pre`` norms feed a Dense layer and are bias-only unless
``force_ln_scale``; ``post`` norms (inside the residual) always have a scale.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

PRE_ATTN = ("normformer", "cogview", "preln", "subln")  # decoder: minus subln (original quirk)
POST_ATTN = ("normformer", "swinv2", "cogview")
FFN_IN = ("normformer", "cogview", "preln", "subln")
FFN_MID = ("normformer", "subln")
FFN_OUT = ("swinv2", "cogview")
EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static, hashable settings shared by the layers of one stack (encoder or decoder).

  Attributes:
    query_length / key_length / cross_key_length: rows / columns of the learned Swin
      position-bias tables (self-attention, and cross-attention for the decoder).
    residual_gain: DeepNet alpha multiplying the residual branch (1.0 otherwise).
    attention_init_gain / cross_attention_init_gain / ffn_init_gain: init multipliers of
      v_proj/out_proj and of the feed-forward kernels (DeepNet beta, subln gain or 1).
    sinkhorn_iters: Sinkformer iterations (encoder self-attention only; 1 = softmax).
    dot_general: the Dense layers' product (inference swaps in
      :func:`dalle_flax.kernels.small_batch_dot_general` on CPU; same parameters).
    one_query_attention: ``(q (b, h, hd), k, v (b, h, m, hd), mask (b, m), scale) -> (b, h, hd)``
      or None where it does not apply, tried for plain softmax attention of a single query (a
      decode step); None (or a None result): the einsum path.
      Inference swaps in :func:`dalle_flax.kernels.one_query_attention` on CPU.
  """

  d_model: int
  num_heads: int
  ffn_dim: int
  ln_positions: str
  ln_type: str
  use_bias: bool
  use_glu: bool
  activation: str
  use_head_scale: bool
  use_cosine_attention: bool
  tau: float
  use_swin_position_embeddings: bool
  force_ln_scale: bool
  dropout: float
  attention_dropout: float
  activation_dropout: float
  init_std: float
  residual_gain: float
  attention_init_gain: float
  cross_attention_init_gain: float
  ffn_init_gain: float
  sinkhorn_iters: int
  query_length: int
  key_length: int
  cross_key_length: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  dot_general: Callable[..., Array] | None = None  # for every Dense (None: lax.dot_general)
  one_query_attention: Callable[..., Array] | None = None

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def smelu(x: Array, beta: float = 1.0) -> Array:
  """SmeLU as dalle-mini computes it: beta/4 for x <= -beta, (x+beta)^2/(4 beta) between, x from beta.

  This is the original module's function, not the paper's (arXiv:2202.06499), which is 0 for
  x <= -beta: the original zeroed x before the quadratic branch, so that branch gives
  beta^2/(4 beta) = beta/4 there (so the value drops from beta/4 to near 0 just above -beta).
  Models trained with the original were trained against this function, so we keep it. The
  gradient is the derivative of this function (0 below -beta); the original's custom JVP
  passed the tangent through unchanged (slope 1) everywhere except at exactly +-beta.
  No released checkpoint uses smelu.
  """
  x = jnp.where(x <= -beta, jnp.zeros_like(x), x)  # as the original: zero x, then the branches
  return jnp.where(x >= beta, x, jnp.square(x + beta) / (4 * beta))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "gelu": lambda x: nn.gelu(x, approximate=False),
  "gelu_new": lambda x: nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
  "relu": nn.relu,
  "silu": nn.swish,
  "swish": nn.swish,
  "tanh": jnp.tanh,
  "sigmoid": nn.sigmoid,
  "linear": lambda x: x,
  "smelu": smelu,
}


def scaled_normal(std: float, gain: float = 1.0) -> Callable[..., Array]:
  """normal(std) initializer multiplied by ``gain`` (DeepNet / subln init, reference §2.5)."""
  base = jax.nn.initializers.normal(std)

  def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    return gain * base(key, shape, dtype)

  return init


def make_norm(ln_type: str, use_scale: bool, name: str, dtype: Any, param_dtype: Any) -> nn.Module:
  """LayerNorm (scale optional, bias always) or RMSNorm (scale optional, no bias), eps 1e-5."""
  if ln_type == "rmsnorm":
    return nn.RMSNorm(epsilon=EPSILON, use_scale=use_scale, dtype=dtype, param_dtype=param_dtype, name=name)
  return nn.LayerNorm(epsilon=EPSILON, use_scale=use_scale, dtype=dtype, param_dtype=param_dtype, name=name)


class NormNamer:
  """Hands out ``LayerNorm_k`` / ``RMSNorm_k`` names in creation order within one scope."""

  def __init__(self, spec: BlockSpec):
    self.spec = spec
    self.prefix = "RMSNorm" if spec.ln_type == "rmsnorm" else "LayerNorm"
    self.count = 0

  def __call__(self, use_scale: bool) -> nn.Module:
    name = f"{self.prefix}_{self.count}"
    self.count += 1
    return make_norm(self.spec.ln_type, use_scale, name, self.spec.dtype, self.spec.param_dtype)


@dataclasses.dataclass(frozen=True)
class KeySegment:
  """Keys/values attended to by a query block, with their positions and a validity mask.

  Attributes:
    key: (b, h, m, hd) keys (already L2-normalised when cosine attention is on).
    value: (b, h, m, hd).
    positions: (m,) int32 key positions (for the Swin position bias).
    mask: bool, broadcastable to (b, 1, n, m); True = may attend.
  """

  key: Array
  value: Array
  positions: Array
  mask: Array | None


class Attention(nn.Module):
  """Multi-head attention of the original ``FlaxBartAttention`` (all DalleBart options).

  Call :meth:`query`, :meth:`key_value`, then :meth:`attend` with one or more key segments
  (a cache plus the current chunk). Attending over segments never copies the cache.
  """

  spec: BlockSpec
  is_encoder: bool = False
  is_cross: bool = False
  deterministic: bool = True

  def setup(self) -> None:
    spec = self.spec
    gain = spec.cross_attention_init_gain if self.is_cross else spec.attention_init_gain
    dense = lambda init: nn.Dense(  # noqa: E731
      spec.d_model, use_bias=spec.use_bias, dtype=spec.dtype, param_dtype=spec.param_dtype, kernel_init=init,
      dot_general=spec.dot_general,
    )
    self.q_proj = dense(scaled_normal(spec.init_std))
    self.k_proj = dense(scaled_normal(spec.init_std))
    self.v_proj = dense(scaled_normal(spec.init_std, gain))
    self.out_proj = dense(scaled_normal(spec.init_std, gain))
    if spec.use_head_scale:
      self.head_scale = self.param(
        "head_scale", jax.nn.initializers.ones, (1, 1, spec.num_heads, 1), spec.param_dtype
      )
    if spec.use_swin_position_embeddings:
      key_length = spec.cross_key_length if self.is_cross else spec.key_length
      self.rel_bias = nn.Embed(
        spec.query_length,
        key_length * spec.num_heads,
        embedding_init=jax.nn.initializers.normal(spec.init_std),
        param_dtype=spec.param_dtype,
      )
    if spec.ln_positions == "subln" and not self.is_cross:
      self.mid_layernorm = make_norm(spec.ln_type, True, "mid_layernorm", spec.dtype, spec.param_dtype)
    self.weights_dropout = nn.Dropout(spec.attention_dropout, broadcast_dims=(0, 1))

  def _split(self, x: Array) -> Array:
    # Head-major (b, h, n, hd): the attention matmuls batch over (b, h) with no transpose, so
    # a cache stored this way is read in place at every decoding step.
    x = x.reshape(x.shape[:2] + (self.spec.num_heads, self.spec.head_dim))  # (b, n, h, hd)
    return jnp.swapaxes(x, 1, 2)

  def _unit(self, x: Array) -> Array:
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)

  def query(self, x: Array) -> Array:
    """(b, n, d) -> (b, h, n, hd) queries (unit-norm with cosine attention)."""
    q = self._split(self.q_proj(x))
    return self._unit(q) if self.spec.use_cosine_attention else q

  def key_value(self, x: Array) -> tuple[Array, Array]:
    """(b, m, d) -> keys, values (b, h, m, hd); keys are unit-norm with cosine attention."""
    k = self._split(self.k_proj(x))
    v = self._split(self.v_proj(x))
    return (self._unit(k) if self.spec.use_cosine_attention else k), v

  def _position_bias(self, q_positions: Array, k_positions: Array) -> Array:
    """Learned Swin bias for the given positions: (1, h, n, m)."""
    table = self.rel_bias.embedding.reshape(self.spec.query_length, -1, self.spec.num_heads)  # (Q, K, h)
    bias = jnp.take(jnp.take(table, q_positions, axis=0), k_positions, axis=1)  # (n, m, h)
    return jnp.transpose(bias, (2, 0, 1))[None].astype(jnp.float32)

  def attend(self, q: Array, segments: Sequence[KeySegment], q_positions: Array) -> Array:
    """Attention output projected back to d_model.

    Args:
      q: (b, h, n, hd) from :meth:`query`.
      segments: key/value blocks; the softmax runs over all of them jointly.
      q_positions: (n,) int32 query positions (Swin bias only).

    Returns:
      (b, n, d) attention output (after head scale, subln mid-norm and out_proj).
    """
    spec = self.spec
    scale = 1.0 / spec.tau if spec.use_cosine_attention else 1.0 / math.sqrt(spec.head_dim)
    one_query = self._one_query_mask(q, segments)
    out = None
    if one_query is not None:  # None back from the hook too: it does not apply (e.g. bfloat16)
      out = spec.one_query_attention(q[:, :, 0], segments[0].key, segments[0].value, one_query, scale)
    if out is None:
      out = self._attend_einsum(q, segments, q_positions, scale)
    else:
      out = out[:, None].astype(spec.dtype)  # (b, 1, h, hd)
    if spec.use_head_scale:
      out = out * self.head_scale  # NormFormer per-head scale
    out = out.reshape(out.shape[:2] + (spec.d_model,))  # (b, n, d)
    if spec.ln_positions == "subln" and not self.is_cross:
      out = self.mid_layernorm(out)
    return self.out_proj(out)

  def _one_query_mask(self, q: Array, segments: Sequence[KeySegment]) -> Array | None:
    """The (b, m) key mask when ``spec.one_query_attention`` can run this call, else None: one
    query, one segment, plain softmax (no Swin bias, no Sinkhorn, no live dropout), a mask
    without a head or query axis."""
    spec = self.spec
    if spec.one_query_attention is None or q.shape[2] != 1 or len(segments) != 1:
      return None
    if spec.use_swin_position_embeddings or (self.is_encoder and spec.sinkhorn_iters > 1):
      return None
    if not self.deterministic and spec.attention_dropout > 0:
      return None
    b, _, m, _ = segments[0].key.shape
    mask = segments[0].mask
    if mask is None:
      return jnp.ones((b, m), bool)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
      return None
    return jnp.broadcast_to(mask, (b, 1, 1, m)).reshape(b, m)

  def _attend_einsum(self, q: Array, segments: Sequence[KeySegment], q_positions: Array, scale: float) -> Array:
    """Softmax (or Sinkhorn) attention over the segments jointly: (b, n, h, hd)."""
    spec = self.spec
    logits = []
    for seg in segments:
      lg = jnp.einsum("bhqd,bhkd->bhqk", q, seg.key).astype(jnp.float32) * scale  # (b, h, n, m)
      if spec.use_swin_position_embeddings:
        lg = lg + self._position_bias(q_positions, seg.positions)
      if seg.mask is not None:
        lg = jnp.where(seg.mask, lg, -jnp.inf)
      logits.append(lg)
    sizes = [lg.shape[-1] for lg in logits]
    logits = logits[0] if len(logits) == 1 else jnp.concatenate(logits, axis=-1)
    if self.is_encoder and spec.sinkhorn_iters > 1:
      weights = self._sinkhorn(logits, segments[0].mask)
    else:
      weights = jax.nn.softmax(logits, axis=-1)
    weights = weights.astype(spec.dtype)
    weights = self.weights_dropout(weights, deterministic=self.deterministic)
    out = 0.0
    start = 0
    for seg, size in zip(segments, sizes):
      out = out + jnp.einsum("bhqk,bhkd->bqhd", weights[..., start : start + size], seg.value)
      start += size
    return out

  def _sinkhorn(self, logits: Array, mask: Array | None) -> Array:
    """Sinkformer: alternate key-wise / query-wise log-normalisation, re-masking each time."""
    for i in range(self.spec.sinkhorn_iters):
      axis = -1 if i % 2 == 0 else -2
      logits = logits - jax.nn.logsumexp(logits, axis=axis, keepdims=True)
      if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return jnp.exp(logits)


class FeedForward(nn.Module):
  """GLU (``W2·LN(act(W0 x) ⊙ W1 x)``) or FFN (``W1·LN(act(W0 x))``) block with its norms."""

  spec: BlockSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec = self.spec
    norm = NormNamer(spec)
    dense_names = iter(f"Dense_{i}" for i in range(3))
    dense = lambda features: nn.Dense(  # noqa: E731
      features,
      use_bias=spec.use_bias,
      dtype=spec.dtype,
      param_dtype=spec.param_dtype,
      kernel_init=scaled_normal(spec.init_std, spec.ffn_init_gain),
      dot_general=spec.dot_general,
      name=next(dense_names),
    )
    act = ACTIVATIONS[spec.activation]
    if spec.ln_positions in FFN_IN:
      x = norm(spec.force_ln_scale)(x)
    if spec.use_glu:
      h = act(dense(spec.ffn_dim)(x)) * dense(spec.ffn_dim)(x)  # (b, n, f)
    else:
      h = act(dense(spec.ffn_dim)(x))
    if spec.ln_positions in FFN_MID:
      h = norm(spec.force_ln_scale)(h)
    h = nn.Dropout(spec.activation_dropout)(h, deterministic=self.deterministic)
    x = dense(spec.d_model)(h)
    if spec.ln_positions in FFN_OUT:
      x = norm(True)(x)
    return nn.Dropout(spec.dropout)(x, deterministic=self.deterministic)


def _residual_block(
  module: nn.Module, norm: NormNamer, spec: BlockSpec, x: Array, sublayer: Callable[[Array], Array], pre: bool
) -> Array:
  """``x·alpha + post(sublayer(pre(x)))`` followed by the postln norm, in the original order."""
  residual = x
  if pre:
    x = norm(spec.force_ln_scale)(x)
  x = sublayer(x)
  if spec.ln_positions in POST_ATTN:
    x = norm(True)(x)
  x = nn.Dropout(spec.dropout)(x, deterministic=module.deterministic)
  x = residual * spec.residual_gain + x
  if spec.ln_positions == "postln":
    x = norm(True)(x)
  return x


class EncoderLayer(nn.Module):
  """Self-attention + feed-forward layer of the text encoder.

  Attributes:
    add_norm: end the layer with a norm (postln every layer; swinv2 every 6th layer).
    use_scale: whether that end norm has a scale (False only for an unscanned last layer).
  """

  spec: BlockSpec
  add_norm: bool = False
  use_scale: bool = True
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, text_mask: Array) -> tuple[Array, None]:
    """(b, t, d), key mask (b, 1, 1, t) bool -> ((b, t, d), None) (scan-friendly)."""
    spec = self.spec
    norm = NormNamer(spec)
    attn = Attention(spec, is_encoder=True, deterministic=self.deterministic, name="FlaxBartAttention_0")
    positions = jnp.arange(x.shape[1])

    def self_attention(h: Array) -> Array:
      k, v = attn.key_value(h)
      return attn.attend(attn.query(h), [KeySegment(k, v, positions, text_mask)], positions)

    x = _residual_block(self, norm, spec, x, self_attention, spec.ln_positions in PRE_ATTN)
    ffn_name = "GLU_0" if spec.use_glu else "FFN_0"
    x = x * spec.residual_gain + FeedForward(spec, self.deterministic, name=ffn_name)(x)
    if self.add_norm:
      x = norm(self.use_scale or spec.force_ln_scale)(x)
    return x, None


class DecoderLayer(nn.Module):
  """Causal self-attention + cross-attention + feed-forward layer of the image decoder.

  Three entry points, each ``(carry, *xs) -> (carry, out)`` so that ``nn.scan`` lifts them
  (see :class:`DecoderStack`); they differ only in how self-attention sees its keys:

  * :meth:`__call__`: teacher forcing over the whole sequence.
  * :meth:`cross_kv`: the cross-attention keys/values of the encoder output, computed once.
  * :meth:`cached`: a chunk of tokens against this layer's KV cache.
  """

  spec: BlockSpec
  add_norm: bool = False
  use_scale: bool = True
  deterministic: bool = True

  def setup(self) -> None:
    self.self_attn = Attention(self.spec, deterministic=self.deterministic, name="FlaxBartAttention_0")
    self.cross_attn = Attention(self.spec, is_cross=True, deterministic=self.deterministic,
                                name="FlaxBartAttention_1")

  def __call__(self, x: Array, encoder_out: Array, text_mask: Array, self_mask: Array | None,
               positions: Array) -> tuple[Array, None]:
    """Teacher forcing: (b, n, d) at positions (n,), key masks (b, 1, 1, t|n) -> ((b, n, d), None)."""
    causal = (positions[None, :] <= positions[:, None])[None, None]  # (1, 1, n, n)
    if self_mask is not None:
      causal = causal & self_mask

    def self_attention(h: Array) -> Array:
      k, v = self.self_attn.key_value(h)
      return self.self_attn.attend(self.self_attn.query(h), [KeySegment(k, v, positions, causal)], positions)

    cross_k, cross_v = self.cross_attn.key_value(encoder_out)
    return self._block(x, self_attention, cross_k, cross_v, text_mask, positions), None

  def cross_kv(self, encoder_out: Array) -> tuple[Array, tuple[Array, Array]]:
    """(b, t, d) -> (encoder_out passed through, cross-attention keys, values (b, h, t, hd))."""
    return encoder_out, self.cross_attn.key_value(encoder_out)

  def cached(self, x: Array, past_k: Array, past_v: Array, cross_k: Array, cross_v: Array, text_mask: Array,
             position: Array) -> tuple[Array, tuple[Array, Array]]:
    """(b, c, d) at ``position + arange(c)``, cache (b, h, slots, hd) -> ((b, c, d), updated cache k, v)."""
    positions = position + jnp.arange(x.shape[1])
    new_kv: list[Array] = []

    def self_attention(h: Array) -> Array:
      k, v = self.self_attn.key_value(h)  # (b, h, c, hd)
      # Write the chunk into the cache first, then attend over the whole cache: the cache is
      # only read after the write, so XLA updates it in place (no per-step copy).
      start = (0, 0, position, 0)
      cache_k = jax.lax.dynamic_update_slice(past_k, k.astype(past_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(past_v, v.astype(past_v.dtype), start)
      new_kv.extend((cache_k, cache_v))
      slots = jnp.arange(past_k.shape[2])
      visible = (slots[None, :] <= positions[:, None])[None, None]  # (1, 1, c, slots)
      return self.self_attn.attend(self.self_attn.query(h), [KeySegment(cache_k, cache_v, slots, visible)], positions)

    return self._block(x, self_attention, cross_k, cross_v, text_mask, positions), tuple(new_kv)

  @nn.compact
  def _block(self, x: Array, self_attention: Callable[[Array], Array], cross_k: Array, cross_v: Array,
             text_mask: Array, positions: Array) -> Array:
    """The layer around ``self_attention``: residual sublayers, feed-forward and norms."""
    spec = self.spec
    norm = NormNamer(spec)
    cross = KeySegment(cross_k, cross_v, jnp.arange(cross_k.shape[2]), text_mask)

    def cross_attention(h: Array) -> Array:
      return self.cross_attn.attend(self.cross_attn.query(h), [cross], positions)

    # The original decoder has no pre-attention norm for subln (reference §2.4, note ‡).
    pre = spec.ln_positions in PRE_ATTN and spec.ln_positions != "subln"
    x = _residual_block(self, norm, spec, x, self_attention, pre)
    x = _residual_block(self, norm, spec, x, cross_attention, pre)
    ffn_name = "GLU_0" if spec.use_glu else "FFN_0"
    x = x * spec.residual_gain + FeedForward(spec, self.deterministic, name=ffn_name)(x)
    if self.add_norm:
      x = norm(self.use_scale or spec.force_ln_scale)(x)
    return x


@dataclasses.dataclass(frozen=True)
class StackSpec:
  """How a stack of identical layers is laid out.

  Attributes:
    block: the layers' settings. num_layers: depth.
    use_scan: ``nn.scan`` with params stacked on a leading axis (``FlaxBart*Layers``) instead
      of unrolled ``FlaxBart*Layer_{i}``.
    remat: rematerialise each layer in the backward pass (``gradient_checkpointing``).
  """

  block: BlockSpec
  num_layers: int
  use_scan: bool
  remat: bool


def adds_norm(ln_positions: str, i: int, num: int) -> bool:
  """Unrolled layers end with a norm for postln, and every 6th layer (not the last) for swinv2."""
  return ln_positions == "postln" or (ln_positions == "swinv2" and (i + 1) % 6 == 0 and i != num - 1)


class EncoderStack(nn.Module):
  """The encoder layers, scanned (``FlaxBartEncoderLayers``) or unrolled (``..._{i}``)."""

  stack: StackSpec
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, key_mask: Array) -> Array:
    """(b, t, d) and a (b, 1, 1, t) bool key mask -> (b, t, d)."""
    block, num = self.stack.block, self.stack.num_layers
    layer = nn.remat(EncoderLayer, prevent_cse=not self.stack.use_scan) if self.stack.remat else EncoderLayer
    if self.stack.use_scan:
      # Scanned layers all carry a scaled end norm (postln); the original did the same.
      scanned = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,), length=num)
      x, _ = scanned(block, block.ln_positions == "postln", True, self.deterministic,
                     name="FlaxBartEncoderLayers")(x, key_mask)
      return x
    for i in range(num):
      x, _ = layer(block, adds_norm(block.ln_positions, i, num), i != num - 1, self.deterministic,
                   name=f"FlaxBartEncoderLayer_{i}")(x, key_mask)
    return x


class DecoderStack(nn.Module):
  """The decoder layers, scanned (``FlaxBartDecoderLayers``) or unrolled (``..._{i}``), with
  the three :class:`DecoderLayer` entry points: :meth:`__call__`, :meth:`cross_kv`, :meth:`cached`."""

  stack: StackSpec
  deterministic: bool = True

  def setup(self) -> None:
    block, num = self.stack.block, self.stack.num_layers
    layer = DecoderLayer
    if self.stack.remat:  # nn.remat lifts __call__ only, the one entry point that is differentiated
      layer = nn.remat(DecoderLayer, prevent_cse=not self.stack.use_scan)
    if self.stack.use_scan:
      lifted = dict(variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=num)
      layer = nn.scan(layer, methods={  # in_axes of the arguments after the carry
          "__call__": dict(lifted, in_axes=(nn.broadcast,) * 4),  # encoder_out, text_mask, self_mask, positions
          "cross_kv": dict(lifted, in_axes=()),
          "cached": dict(lifted, in_axes=(0, 0, 0, 0, nn.broadcast, nn.broadcast)),  # caches; text_mask, position
      })
      self.scanned = layer(block, block.ln_positions == "postln", True, self.deterministic,
                           name="FlaxBartDecoderLayers")
    else:
      self.unrolled = [layer(block, adds_norm(block.ln_positions, i, num), i != num - 1, self.deterministic,
                             name=f"FlaxBartDecoderLayer_{i}") for i in range(num)]

  def __call__(self, x: Array, encoder_out: Array, text_mask: Array, self_mask: Array | None,
               positions: Array) -> Array:
    """Teacher forcing through every layer (see :meth:`DecoderLayer.__call__`): (b, n, d) -> (b, n, d)."""
    if self.stack.use_scan:
      return self.scanned(x, encoder_out, text_mask, self_mask, positions)[0]
    for layer in self.unrolled:
      x, _ = layer(x, encoder_out, text_mask, self_mask, positions)
    return x

  def cross_kv(self, encoder_out: Array) -> tuple[Array, Array]:
    """(b, t, d) -> cross-attention keys, values stacked (layers, b, h, t, hd)."""
    if self.stack.use_scan:
      return self.scanned.cross_kv(encoder_out)[1]
    keys, values = zip(*(layer.cross_kv(encoder_out)[1] for layer in self.unrolled))
    return jnp.stack(keys), jnp.stack(values)

  def cached(self, x: Array, self_key: Any, self_value: Any, cross_key: Any, cross_value: Any, text_mask: Array,
             position: Array) -> tuple[Array, tuple[Any, Any]]:
    """A chunk through every layer (:meth:`DecoderLayer.cached`) -> (x, (keys, values)); caches are
    stacked (layers, b, h, m, hd) when scanned, per-layer tuples when unrolled (see ``DecoderCache``)."""
    if self.stack.use_scan:
      return self.scanned.cached(x, self_key, self_value, cross_key, cross_value, text_mask, position)
    new_kv = []
    for layer, *layer_cache in zip(self.unrolled, self_key, self_value, cross_key, cross_value):
      x, kv = layer.cached(x, *layer_cache, text_mask, position)
      new_kv.append(kv)
    keys, values = zip(*new_kv)
    return x, (keys, values)
