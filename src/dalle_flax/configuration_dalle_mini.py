"""Configuration of the DalleBart text-to-image-token model (DALL·E mini / mega).

Example::

  from dalle_flax import DalleBartConfig
  config = DalleBartConfig.from_pretrained("path/to/dalle-mini")   # legacy config.json as is
  tiny = DalleBartConfig(d_model=64, encoder_layers=2, decoder_layers=2, image_length=16)

Every key of the original ``dalle_mini.model.configuration.DalleBartConfig`` is kept with its
name and default, so the released ``config.json`` files load unchanged. Keys that are ours
(needed to host the 2021 seed model, see ``dalle_flax.convert.bart2021``) are documented on
the class and all default to the DalleBart behaviour.

transformers 5.x drops generation keys (``min_length``, ``max_length``, ``do_sample``...)
from model configs. The raw values found at construction are kept in
``config.legacy_generation_kwargs``; :meth:`DalleBartConfig.legacy_generation_kwargs_from_dict`
does the same for a raw ``config.json`` dict (feed either to
``GenerationConfig.from_model_config``).
"""


import logging
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, GenerationConfig, PreTrainedConfig

from .configuration_utils import CheckedConfigMixin, check_finite_positive, check_positive_ints, check_rates

logger = logging.getLogger(__name__)

LN_POSITIONS = ("normformer", "swinv2", "cogview", "postln", "preln", "subln")
LN_POSITION_ALIASES = {"deepnet": "postln"}
LN_TYPES = ("layernorm", "rmsnorm")
ACTIVATIONS = (
  "gelu",
  "gelu_new",
  "gelu_fast",
  "gelu_pytorch_tanh",
  "quick_gelu",
  "relu",
  "silu",
  "swish",
  "tanh",
  "sigmoid",
  "linear",
  "smelu",
)


MAX_LAYERS = 256
"""Upper bound on ``encoder_layers`` / ``decoder_layers``: far beyond any real model (mega has
24), low enough that building an unscanned model from a hostile config traces in bounded time."""

# sizes that must be integers >= 1
_SIZES = ("encoder_vocab_size", "image_vocab_size", "image_length", "max_text_length", "encoder_layers",
          "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "encoder_attention_heads",
          "decoder_attention_heads", "d_model", "sinkhorn_iters")


@strict
class DalleBartConfig(CheckedConfigMixin, PreTrainedConfig):
  r"""Configuration of :class:`~dalle_flax.FlaxDalleMiniForConditionalGeneration`.

  Keys of the original DalleBart (reference §2.2; defaults are the original ones):
  ``normalize_text``, ``encoder_vocab_size``, ``image_vocab_size`` (the decoder embedding
  and ``lm_head`` have ``image_vocab_size + 1`` rows), ``image_length``, ``max_text_length``,
  ``encoder_layers``/``decoder_layers``, ``encoder_ffn_dim``/``decoder_ffn_dim``,
  ``encoder_attention_heads``/``decoder_attention_heads``, ``d_model``,
  ``activation_function``, ``dropout``/``attention_dropout``/``activation_dropout``,
  ``init_std``, ``scale_embedding``, ``gradient_checkpointing`` (remat per layer),
  ``use_scan`` (None means ``ln_positions != "swinv2"``), ``use_cache``,
  ``tie_word_embeddings`` (must stay False), ``use_bias``, ``ln_type``
  ("layernorm" | "rmsnorm"), ``ln_positions`` (normformer, swinv2, cogview, postln, preln,
  subln; "deepnet" is stored as "postln"), ``use_head_scale``, ``use_cosine_attention``,
  ``tau_init``, ``use_absolute_position_embeddings``, ``use_swin_position_embeddings``,
  ``use_deepnet_scaling``, ``use_subln_init``, ``use_glu``, ``use_alibi`` (must be False),
  ``sinkhorn_iters``, ``use_final_ln_encoder``/``use_final_ln_decoder``,
  ``force_ln_scale``, ``decoder_start_token_id``/``bos_token_id``/``pad_token_id``/
  ``eos_token_id`` (None means ``image_vocab_size``), ``encoder_layerdrop``/
  ``decoder_layerdrop`` (legacy, unused).

  Our additions (defaults reproduce DalleBart; the 2021 seed conversion sets them):
    position_embedding_offset: rows skipped at the start of both position tables
      (BART's offset, 2 for the seed model; 0 for DalleBart).
    encoder_max_position_embeddings: usable rows of the encoder position table
      (None means ``max_text_length``).
    decoder_max_position_embeddings: usable rows of the decoder position table and
      length of the decoder KV cache (None means ``image_length``; the seed model
      has ``image_length + 1``).
    use_final_logits_bias: add a learned ``final_logits_bias`` of shape
      ``(1, image_vocab_size + 1)`` to the logits (seed model).
  """

  model_type: ClassVar[str] = "dallebart"
  _pipeline_key: ClassVar[str] = "text_config"
  attribute_map: ClassVar[dict[str, str]] = {
    "num_attention_heads": "encoder_attention_heads",
    "hidden_size": "d_model",
  }

  normalize_text: bool = False
  encoder_vocab_size: int = 50264
  image_vocab_size: int = 16384
  image_length: int = 256
  max_text_length: int = 64
  encoder_layers: int = 12
  encoder_ffn_dim: int = 4096
  encoder_attention_heads: int = 16
  decoder_layers: int = 12
  decoder_ffn_dim: int = 4096
  decoder_attention_heads: int = 16
  encoder_layerdrop: float | int = 0.0
  decoder_layerdrop: float | int = 0.0
  activation_function: str = "gelu"
  d_model: int = 1024
  dropout: float | int = 0.1
  attention_dropout: float | int = 0.0
  activation_dropout: float | int = 0.0
  init_std: float | int = 0.02
  scale_embedding: bool = False
  gradient_checkpointing: bool = True
  use_scan: bool | None = None
  use_cache: bool = True
  tie_word_embeddings: bool = False
  is_encoder_decoder: bool = True
  decoder_start_token_id: int | None = None
  bos_token_id: int | None = None
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  use_bias: bool = False
  ln_type: str = "layernorm"
  ln_positions: str = "normformer"
  use_head_scale: bool = False
  use_cosine_attention: bool = False
  tau_init: float | int = 0.05
  use_absolute_position_embeddings: bool = True
  use_swin_position_embeddings: bool = False
  use_deepnet_scaling: bool = False
  use_subln_init: bool = False
  use_glu: bool = True
  use_alibi: bool = False
  sinkhorn_iters: int = 1
  use_final_ln_encoder: bool = True
  use_final_ln_decoder: bool = True
  force_ln_scale: bool = False
  # --- our additions (2021 seed model) ---
  position_embedding_offset: int = 0
  encoder_max_position_embeddings: int | None = None
  decoder_max_position_embeddings: int | None = None
  use_final_logits_bias: bool = False

  def __post_init__(self, **kwargs: Any) -> None:
    # transformers pops generation keys in super().__post_init__: keep the raw values first.
    generation_keys = GenerationConfig._get_default_generation_params().keys()
    legacy = {k: kwargs[k] for k in generation_keys if k in kwargs and k != "use_cache"}
    if legacy.get("forced_bos_token_id") is None and kwargs.get("force_bos_token_to_be_generated"):
      # Same rule as the original config (BART-CNN legacy flag).
      legacy["forced_bos_token_id"] = self.bos_token_id
      logger.warning("force_bos_token_to_be_generated is deprecated; set forced_bos_token_id instead")
    kwargs.pop("force_bos_token_to_be_generated", None)
    self._legacy_generation_kwargs = legacy

    self.ln_positions = LN_POSITION_ALIASES.get(self.ln_positions, self.ln_positions)
    if self.use_scan is None:
      self.use_scan = self.ln_positions != "swinv2"
    for key in ("decoder_start_token_id", "bos_token_id", "pad_token_id", "eos_token_id"):
      if getattr(self, key) is None:
        setattr(self, key, self.image_vocab_size)
    self._check_dalle_bart()
    super().__post_init__(**kwargs)

  # ------------------------------------------------------------------ validation
  def validate_dalle_bart(self) -> None:
    """Part of ``@strict`` validation (also run at save time)."""
    self._check_dalle_bart()

  def _check_dalle_bart(self) -> None:
    check_positive_ints(self, _SIZES)
    for name in ("encoder_layers", "decoder_layers"):
      if getattr(self, name) > MAX_LAYERS:
        raise ValueError(f"{name} must be at most {MAX_LAYERS} (mega has 24), got {getattr(self, name)}")
    check_rates(self, ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                       "decoder_layerdrop"))
    check_finite_positive(self, ("init_std",), allow_zero=True)
    check_finite_positive(self, ("tau_init",))
    for key, length in (("encoder_max_position_embeddings", "max_text_length"),
                        ("decoder_max_position_embeddings", "image_length")):
      value = getattr(self, key)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < getattr(self, length)):
        raise ValueError(
            f"{key} must be None or an integer >= {length}={getattr(self, length)}, got {value!r}"
        )
    start = self.decoder_start_token_id
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.image_vocab_size:
      raise ValueError(
          f"decoder_start_token_id must be a row of the decoder embedding, 0..image_vocab_size="
          f"{self.image_vocab_size}, got {start!r}"
      )
    positions = LN_POSITIONS + tuple(LN_POSITION_ALIASES)
    if self.ln_positions not in positions:
      raise ValueError(
        f"ln_positions={self.ln_positions!r} is not supported; expected one of {positions}"
      )
    if self.ln_type not in LN_TYPES:
      raise ValueError(f"ln_type={self.ln_type!r} is not supported; expected one of {LN_TYPES}")
    if self.activation_function not in ACTIVATIONS:
      raise ValueError(
        f"activation_function={self.activation_function!r} is not supported; "
        f"expected one of {ACTIVATIONS}"
      )
    if self.use_alibi:
      raise ValueError(
        "use_alibi=True is not implemented (the original rejects it too); set use_alibi=False"
      )
    if self.use_scan and self.ln_positions == "swinv2":
      raise ValueError(
        "use_scan=True cannot be combined with ln_positions='swinv2' (its extra norm every 6th "
        "layer makes layers differ); set use_scan=False or leave it None"
      )
    if self.tie_word_embeddings:
      raise ValueError(
        "tie_word_embeddings=True has no meaning for DalleBart (encoder and decoder vocabularies "
        "differ and lm_head is a separate Dense); set tie_word_embeddings=False"
      )
    if isinstance(self.position_embedding_offset, bool) or self.position_embedding_offset < 0:
      raise ValueError(f"position_embedding_offset must be >= 0, got {self.position_embedding_offset}")
    for side in ("encoder", "decoder"):
      heads = getattr(self, f"{side}_attention_heads")
      if self.d_model % heads:
        raise ValueError(
          f"d_model={self.d_model} must be a positive multiple of {side}_attention_heads={heads}"
        )

  # ------------------------------------------------------------------ derived values
  @property
  def encoder_positions(self) -> int:
    """Number of encoder positions the position table serves."""
    return self.encoder_max_position_embeddings or self.max_text_length

  @property
  def decoder_positions(self) -> int:
    """Number of decoder positions (position table rows in use, KV-cache length)."""
    return self.decoder_max_position_embeddings or self.image_length

  # ------------------------------------------------------------------ legacy generation keys
  @property
  def legacy_generation_kwargs(self) -> dict[str, Any]:
    """Generation keys of the original config with the raw values this config was built from.

    Defaults of the original DalleBartConfig (``do_sample=True``, ``min_length`` and
    ``max_length`` equal to ``image_length + 1``) are filled in when absent.
    """
    defaults = {
      "do_sample": True,
      "min_length": self.image_length + 1,
      "max_length": self.image_length + 1,
    }
    return {**defaults, **getattr(self, "_legacy_generation_kwargs", {})}

  @classmethod
  def legacy_generation_kwargs_from_dict(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
    """Returns the generation keys present in a raw ``config.json`` dict (values unchanged)."""
    generation_keys = GenerationConfig._get_default_generation_params().keys()
    return {k: config_dict[k] for k in generation_keys if k in config_dict and k != "use_cache"}

  def to_dict(self) -> dict[str, Any]:
    output = super().to_dict()
    output.pop("_legacy_generation_kwargs", None)
    return output


def register() -> None:
  """Registers ``"dallebart"`` with ``transformers.AutoConfig`` (idempotent)."""
  AutoConfig.register("dallebart", DalleBartConfig, exist_ok=True)


__all__ = ["DalleBartConfig", "register"]
