"""The VQGAN's training losses and the pure, jitted train / eval steps (data-parallel over "dp").

Example::

    model = FlaxVQGANModel(VQGANConfig(resolution=64, ch_mult=(1, 1, 2, 2), n_embed=512))
    state = init_vqgan_state(model, model.params, optimizer, mesh, seed=0)
    train_step = make_vqgan_train_step(model, optimizer, mesh, VQGANLossSettings())
    state, metrics = train_step(state, shard_images(pixels, mesh))    # metrics["loss"], ...

The losses (van den Oord et al. 2017, "Neural Discrete Representation Learning", eq. 3; taming's
``VQLPIPSWithDiscriminator`` without its perceptual and adversarial terms, which need
pretrained networks we may not download):

    loss = reconstruction(decode(z + sg(z_q - z)), x)      L1 or L2 on [0, 1] pixels
         + |sg(z) - z_q|^2                                  codebook: codes move to the encoder
         + beta * |z - sg(z_q)|^2                           commitment: the encoder stays near its codes

with ``z`` the encoder's latents, ``z_q`` their nearest codebook entries (the same argmin as
:class:`~dalle_flax.modeling_flax_vqgan.VectorQuantizer`, so the exported model encodes as it
trained) and ``sg`` stop-gradient (the straight-through estimator carries the reconstruction
gradient past the argmin).

Dead codes: a codebook trained by gradients alone tends to collapse onto a few entries. Every
``restart_steps`` steps, entries whose running share of the batch's codes fell below
``restart_threshold / n_embed`` are moved onto latents drawn at random from the batch (Dhariwal
et al. 2020, "Jukebox", §3.1); step 0 moves all of them, which initialises the codebook from
data. The running usage lives in the state, so a resumed run restarts the same codes.
The exported weights are a plain VQGAN: nothing of this changes how the model encodes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..sharding import batch_sharding

__all__ = ["RECONSTRUCTION_LOSSES", "VQGANLossSettings", "VQGANTrainState", "init_vqgan_state",
           "make_vqgan_eval_step", "make_vqgan_train_step", "shard_images", "vqgan_losses"]

Array = jax.Array
RECONSTRUCTION_LOSSES = ("l1", "l2")
_CODEBOOK = ("quantize", "embedding", "embedding")


@dataclasses.dataclass(frozen=True)
class VQGANLossSettings:
  """The loss terms and codebook upkeep of VQGAN training (hashable).

  Attributes:
    reconstruction: "l1" (crisper edges) or "l2", mean over pixels and channels.
    codebook_weight: weight of ``|sg(z) - z_q|^2``.
    commitment_weight: ``beta`` of ``beta * |z - sg(z_q)|^2`` (0.25 as in the VQ-VAE paper).
    restart_steps: move dead codes onto batch latents every this many steps (0: never;
      step 0 counts, so the codebook starts from data).
    restart_threshold: a code is dead when its running share of codes is below
      ``restart_threshold / n_embed``.
    usage_decay: decay of the running code usage (per step).
    quantize_from_step: the first this many steps decode the encoder's latents unquantized
      (a plain autoencoder warms up; the codebook and commitment terms still train), and the
      step that turns quantization on moves every code onto batch latents, as step 0 does.
  """

  reconstruction: str = "l1"
  codebook_weight: float = 1.0
  commitment_weight: float = 0.25
  restart_steps: int = 100
  restart_threshold: float = 0.03
  usage_decay: float = 0.99
  quantize_from_step: int = 0

  def __post_init__(self) -> None:
    if self.reconstruction not in RECONSTRUCTION_LOSSES:
      raise ValueError(f"reconstruction must be one of {list(RECONSTRUCTION_LOSSES)}, got {self.reconstruction!r}.")
    for name in ("codebook_weight", "commitment_weight", "restart_threshold"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
    if self.restart_steps < 0:
      raise ValueError(f"restart_steps must be >= 0 (0: never), got {self.restart_steps}.")
    if self.quantize_from_step < 0:
      raise ValueError(f"quantize_from_step must be >= 0, got {self.quantize_from_step}.")
    if not 0.0 <= self.usage_decay < 1.0:
      raise ValueError(f"usage_decay must be in [0, 1), got {self.usage_decay}.")


@flax.struct.dataclass
class VQGANTrainState:
  """What a VQGAN train step reads and writes (a pytree; orbax saves it as it is).

  Attributes:
    step: () int32, steps done.
    params: the VQGAN's parameters, float32.
    opt_state: the optimizer's state.
    key: (2,) uint32 raw key data; step ``s`` draws its restart latents with ``fold_in(key, s)``.
    usage: (n_embed,) float32 running share of each code among the batch's codes.
  """

  step: Array
  params: Any
  opt_state: Any
  key: Array
  usage: Array


def vqgan_losses(module: Any, params: Any, pixels: Array, settings: VQGANLossSettings,
                 quantized: Array | bool = True) -> tuple[Array, dict[str, Array]]:
  """The training loss of ``module`` (a linen ``VQGAN``) on (b, H, W, 3) pixels in [0, 1].

  ``quantized`` False (a bool or a traced scalar) decodes the unquantized latents instead
  (the warm-up of ``settings.quantize_from_step``).

  Returns:
    (loss, aux) with aux: the loss terms, ``codes`` (b, h*w) int32 and ``latents`` (b*h*w, d)
    (the encoder's, float32, for restarts).
  """
  latents = module.apply({"params": params}, pixels, method="encode_latents").astype(jnp.float32)
  codebook = _get(params, _CODEBOOK).astype(jnp.float32)
  flat = latents.reshape(-1, latents.shape[-1])
  codes = nearest_codes(flat, codebook)
  vectors = codebook[codes].reshape(latents.shape)
  codebook_loss = jnp.mean((jax.lax.stop_gradient(latents) - vectors) ** 2)
  commitment_loss = jnp.mean((latents - jax.lax.stop_gradient(vectors)) ** 2)
  decoded = jnp.where(quantized, latents + jax.lax.stop_gradient(vectors - latents), latents)
  images = module.apply({"params": params}, decoded, method="decode").astype(jnp.float32)
  error = images - pixels.astype(jnp.float32)
  reconstruction = jnp.mean(jnp.abs(error)) if settings.reconstruction == "l1" else jnp.mean(error ** 2)
  loss = (reconstruction + settings.codebook_weight * codebook_loss
          + settings.commitment_weight * commitment_loss)
  aux = {"reconstruction_loss": reconstruction, "codebook_loss": codebook_loss,
         "commitment_loss": commitment_loss, "mse": jnp.mean(error ** 2),
         "codes": codes.reshape(pixels.shape[0], -1), "latents": flat}
  return loss, aux


def nearest_codes(flat: Array, codebook: Array) -> Array:
  """(m, d) latents, (n, d) codebook -> (m,) int32 nearest entries (the quantizer's rule)."""
  distances = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)
               - 2 * jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
  return jnp.argmin(distances, axis=1).astype(jnp.int32)


def init_vqgan_state(model: Any, params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                     seed: int = 0) -> VQGANTrainState:
  """The state at step 0, replicated over ``mesh``: ``params`` (None: random init) and fresh
  optimizer state, built inside one ``jax.jit``."""
  shardings = vqgan_state_shardings(model, optimizer, mesh)
  key = jax.random.key_data(jax.random.key(seed))
  n_embed = model.config.n_embed
  if params is None:
    init = jax.jit(lambda k: _new_state(model.init_weights(jax.random.wrap_key_data(k)), optimizer, k, n_embed),
                   out_shardings=shardings)
    return init(key)
  init = jax.jit(lambda p, k: _new_state(p, optimizer, k, n_embed), out_shardings=shardings)
  return init(params, key)


def vqgan_state_shardings(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> VQGANTrainState:
  """Every leaf replicated: a VQGAN is small next to its activations, so it trains data-parallel."""
  replicated = NamedSharding(mesh, P())
  shapes = _state_shapes(model, optimizer)
  return jax.tree.map(lambda _: replicated, shapes)


def abstract_vqgan_state(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh) -> VQGANTrainState:
  """The state's shapes, dtypes and shardings (what orbax restores into)."""
  shapes = _state_shapes(model, optimizer)
  shardings = vqgan_state_shardings(model, optimizer, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def make_vqgan_train_step(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
                          settings: VQGANLossSettings
                          ) -> Callable[[VQGANTrainState, Array], tuple[VQGANTrainState, dict]]:
  """The jitted ``train_step(state, pixels) -> (state, metrics)``; ``state`` is donated.

  ``pixels``: (B, H, W, 3) float32 in [0, 1], split over "dp" (:func:`shard_images`). Metrics
  (float32 scalars): ``loss`` and its terms, ``mse``, ``grad_norm``, ``codes_used`` (distinct
  codes in the batch), ``perplexity`` (exp of the entropy of the batch's code histogram) and
  ``restarted`` (codes moved this step).
  """
  module = model.module  # deterministic: VQGAN dropout is not trained here (the released ones use 0)
  n_embed = model.config.n_embed
  shardings = vqgan_state_shardings(model, optimizer, mesh)

  def train_step(state: VQGANTrainState, pixels: Array) -> tuple[VQGANTrainState, dict]:
    (loss, aux), grads = jax.value_and_grad(
        lambda p: vqgan_losses(module, p, pixels, settings, state.step >= settings.quantize_from_step),
        has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    counts = jnp.zeros((n_embed,), jnp.float32).at[aux["codes"].reshape(-1)].add(1.0)
    share = counts / counts.sum()
    usage = settings.usage_decay * state.usage + (1.0 - settings.usage_decay) * share
    params, usage, restarted = _restart_dead_codes(params, usage, aux["latents"], state, settings, n_embed)
    probs = jnp.where(share > 0, share, 1.0)
    metrics = {"loss": loss, **{k: aux[k] for k in ("reconstruction_loss", "codebook_loss", "commitment_loss",
                                                    "mse")},
               "grad_norm": optax.tree.norm(grads), "codes_used": jnp.sum(counts > 0).astype(jnp.float32),
               "perplexity": jnp.exp(-jnp.sum(share * jnp.log(probs))), "restarted": restarted}
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, usage=usage)
    return state, metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def make_vqgan_eval_step(model: Any, mesh: Mesh, settings: VQGANLossSettings
                         ) -> Callable[[Any, Array], dict[str, Array]]:
  """The jitted ``eval_step(params, pixels) -> metrics`` (the train metrics but no gradient),
  plus the batch's ``codes`` (B, h*w) so the caller can count codebook use over the eval set."""
  module = model.module

  def eval_step(params: Any, pixels: Array) -> dict[str, Array]:
    loss, aux = vqgan_losses(module, params, pixels, settings)
    return {"loss": loss, **{k: aux[k] for k in ("reconstruction_loss", "codebook_loss", "commitment_loss",
                                                 "mse", "codes")}}

  replicated = NamedSharding(mesh, P())
  return jax.jit(eval_step, in_shardings=(replicated, batch_sharding(mesh)), out_shardings=replicated)


def shard_images(pixels: np.ndarray, mesh: Mesh) -> Array:
  """This process's (b, H, W, 3) images -> one global batch split over "dp"."""
  rows, dp = len(pixels) * jax.process_count(), mesh.shape["dp"]
  if rows % dp:
    raise ValueError(f"the global batch has {rows} images, not divisible by the mesh's dp={dp}; use a "
                     "batch size that is a multiple of dp.")
  return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(pixels, np.float32))


# --- helpers ---------------------------------------------------------------------------------------
def _restart_dead_codes(params: Any, usage: Array, latents: Array, state: VQGANTrainState,
                        settings: VQGANLossSettings, n_embed: int) -> tuple[Any, Array, Array]:
  """Moves dead codes onto random batch latents on restart steps; returns (params, usage, count)."""
  if settings.restart_steps == 0:
    return params, usage, jnp.zeros((), jnp.float32)
  due = state.step % settings.restart_steps == 0
  fresh_start = (state.step == 0) | (state.step == settings.quantize_from_step)  # (re)initialise from data
  dead = (due & (usage < settings.restart_threshold / n_embed)) | fresh_start
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
  picks = jax.random.randint(key, (n_embed,), 0, latents.shape[0])
  fresh = jax.lax.stop_gradient(latents[picks])
  codebook = _get(params, _CODEBOOK)
  codebook = jnp.where(dead[:, None], fresh.astype(codebook.dtype), codebook)
  usage = jnp.where(dead, 1.0 / n_embed, usage)  # a moved code gets a fair share to prove itself
  return _set(params, _CODEBOOK, codebook), usage, jnp.sum(dead).astype(jnp.float32)


def _new_state(params: Any, optimizer: optax.GradientTransformation, key: Array, n_embed: int) -> VQGANTrainState:
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return VQGANTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), key=key,
                         usage=jnp.zeros((n_embed,), jnp.float32))


def _state_shapes(model: Any, optimizer: optax.GradientTransformation) -> VQGANTrainState:
  return jax.eval_shape(lambda p, k: _new_state(p, optimizer, k, model.config.n_embed),
                        _fp32(model.params_shape_tree), jax.ShapeDtypeStruct((2,), jnp.uint32))


def _fp32(shapes: Any) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: Any, path: tuple[str, ...], value: Any) -> Any:
  """A copy of nested dict ``tree`` with ``path`` replaced (the rest shared)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _set(tree[path[0]], path[1:], value)
  return out
