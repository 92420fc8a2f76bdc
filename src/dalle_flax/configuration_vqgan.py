"""Configuration of the VQGAN image tokenizer (taming-transformers / vqgan-jax layout).

Example::

  config = VQGANConfig.from_pretrained("path/to/vqgan_imagenet_f16_16384")  # legacy config.json works

The keys are the legacy ones written by ``vqgan-jax`` (``ch``, ``ch_mult``, ``n_embed`` ...), so the
released ``config.json`` files (which carry no ``model_type``) load unchanged. The defaults are the
released ``vqgan_imagenet_f16_16384`` values: 256x256 images <-> 16x16 = 256 codes out of 16384.
"""

import logging
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig

from .configuration_utils import CheckedConfigMixin

logger = logging.getLogger(__name__)

GROUP_NORM_GROUPS = 32
"""The released VQGANs' GroupNorm group count (taming-transformers): the ``norm_num_groups`` default."""
MAX_RES_BLOCKS, MAX_LEVELS = 16, 12
"""Upper bounds on ``num_res_blocks`` and ``len(ch_mult)``: far beyond any real VQGAN, and low
enough that building a model from a hostile config cannot spend minutes tracing modules."""


@strict
class VQGANConfig(CheckedConfigMixin, PreTrainedConfig):
  r"""Configuration of a VQGAN (encoder, vector quantizer, decoder).

  Args:
    ch: Base channel count; level ``i`` has ``ch * ch_mult[i]`` channels. A multiple of
      ``norm_num_groups``.
    out_ch: Channels of the decoded image (3 for RGB).
    in_channels: Channels of the encoded image (3 for RGB).
    num_res_blocks: ResnetBlocks per encoder level (the decoder has one more per level).
    resolution: Image side the model was built for. Decides, with ``attn_resolutions``, which
      levels have attention; other image sides divisible by the downsampling factor also work.
    z_channels: Channels of the encoder output / decoder input.
    ch_mult: Channel multiplier per resolution level; ``len(ch_mult) - 1`` halvings.
    attn_resolutions: Feature-map sides (at ``resolution``) whose levels get attention blocks.
    n_embed: Codebook size (number of image tokens).
    embed_dim: Dimension of a codebook vector.
    dropout: Dropout rate inside ResnetBlocks (inference never applies it).
    double_z: Whether the encoder outputs ``2 * z_channels`` channels (mean and log-variance).
    resamp_with_conv: Whether down/upsampling use a 3x3 conv (else average pooling / plain
      nearest upsampling, with no parameters).
    give_pre_end: Whether the decoder returns its features before ``norm_out``/``conv_out``.
    norm_num_groups: Groups of every GroupNorm (32, taming's, for the released models). A small
      model wants several channels per group: with one, a GroupNorm is an instance norm, which
      takes away the colour of a flat image region.

  A legacy ``num_resolutions`` key (written by vqgan-jax) is accepted and checked against
  ``len(ch_mult)``; it is derived, so it is never stored.
  """

  model_type = "vqgan"
  _pipeline_key: ClassVar[str] = "vqgan_config"

  ch: int = 128
  out_ch: int = 3
  in_channels: int = 3
  num_res_blocks: int = 2
  resolution: int = 256
  z_channels: int = 256
  ch_mult: list[int] | tuple[int, ...] = (1, 1, 2, 2, 4)
  attn_resolutions: list[int] | tuple[int, ...] = (16,)
  n_embed: int = 16384
  embed_dim: int = 256
  dropout: float | int = 0.0
  double_z: bool = False
  resamp_with_conv: bool = True
  give_pre_end: bool = False
  norm_num_groups: int = GROUP_NORM_GROUPS

  def __post_init__(self, **kwargs: Any) -> None:
    legacy_num_resolutions = kwargs.pop("num_resolutions", None)
    # Tuples keep the config immutable where it matters; to_dict() writes them back as JSON lists.
    self.ch_mult = tuple(self.ch_mult)
    self.attn_resolutions = tuple(self.attn_resolutions)
    if legacy_num_resolutions is not None and legacy_num_resolutions != len(self.ch_mult):
      raise ValueError(
          f"config has num_resolutions={legacy_num_resolutions!r} but ch_mult={list(self.ch_mult)} "
          f"has {len(self.ch_mult)} levels; num_resolutions is derived from ch_mult, so remove "
          "it or make ch_mult match."
      )
    super().__post_init__(**kwargs)

  @property
  def num_resolutions(self) -> int:
    """Number of resolution levels, ``len(ch_mult)``."""
    return len(self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    """Image side / latent side, ``2 ** (num_resolutions - 1)`` (16 for the f16 models)."""
    return 2 ** (self.num_resolutions - 1)

  @property
  def latent_resolution(self) -> int:
    """Side of the code map for a ``resolution``-sized image (16 for the released model)."""
    return self.resolution // self.downsample_factor

  # Class validators: @strict runs every ``validate_*`` method after __init__ and on save.
  def validate_positive_sizes(self) -> None:
    """Sizes must be positive; the dropout rate must lie in [0, 1)."""
    for name in ("ch", "out_ch", "in_channels", "num_res_blocks", "resolution", "z_channels",
                 "n_embed", "embed_dim"):
      value = getattr(self, name)
      if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
    # structural counts: each is a traced Python loop, so a typo of 10**6 would hang a load
    for name, value, most in (("num_res_blocks", self.num_res_blocks, MAX_RES_BLOCKS),
                              ("len(ch_mult)", len(self.ch_mult), MAX_LEVELS)):
      if value > most:
        raise ValueError(f"{name} must be at most {most} (the released VQGAN has 2 res blocks and 5 "
                         f"levels), got {value}")

  def validate_channel_layout(self) -> None:
    """ch_mult must be non-empty positive integers, every level's channels divisible by the groups."""
    if len(self.ch_mult) == 0:
      raise ValueError("ch_mult must list at least one channel multiplier, got []")
    for i, mult in enumerate(self.ch_mult):
      if isinstance(mult, bool) or not isinstance(mult, int) or mult <= 0:
        raise ValueError(f"ch_mult[{i}] must be a positive integer, got {mult!r}")
    groups = self.norm_num_groups
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
      raise ValueError(f"norm_num_groups must be a positive integer, got {groups!r}")
    for channels in [self.ch] + [self.ch * mult for mult in self.ch_mult]:
      if channels % groups:
        raise ValueError(
            f"GroupNorm uses norm_num_groups={groups} groups, so every level's channel count must "
            f"be a multiple of {groups}; ch={self.ch} with ch_mult={list(self.ch_mult)} "
            f"gives {channels}. Use a ch that is a multiple of {groups}."
        )

  def validate_resolutions(self) -> None:
    """resolution must survive every halving; attention sides must be levels that exist."""
    factor = 2 ** (len(self.ch_mult) - 1)
    if self.resolution % factor:
      raise ValueError(
          f"resolution={self.resolution} must be divisible by 2**(len(ch_mult) - 1) = {factor} "
          f"(ch_mult has {len(self.ch_mult)} levels)"
      )
    level_sides = [self.resolution // 2**i for i in range(len(self.ch_mult))]
    for side in self.attn_resolutions:
      if isinstance(side, bool) or not isinstance(side, int) or side not in level_sides:
        raise ValueError(
            f"attn_resolutions entry {side!r} is not the side of any level; with "
            f"resolution={self.resolution} and {len(self.ch_mult)} levels the sides are "
            f"{level_sides}"
        )


def register() -> None:
  """Registers ``VQGANConfig`` with ``AutoConfig`` under model_type "vqgan"; safe to call twice.

  transformers ships no "vqgan" model type, so the only possible clash is another package that
  registered a different class under that name; that raises rather than silently replacing it.
  """
  from transformers.models.auto.configuration_auto import CONFIG_MAPPING

  registered = CONFIG_MAPPING._extra_content.get("vqgan")
  if registered is VQGANConfig:
    return
  if registered is not None:
    raise ValueError(
        f"model_type 'vqgan' is already registered with AutoConfig by {registered!r}; "
        "dalle_flax cannot register its VQGANConfig under the same name"
    )
  AutoConfig.register("vqgan", VQGANConfig)


__all__ = ["VQGANConfig", "register"]
