"""Loading configs from untrusted ``config.json`` files: every failure a ``ValueError`` or ``OSError``.

transformers' config machinery lets several kinds of bad input through as exceptions a caller
does not expect from a loader (found by fuzzing, ``tests/unit/test_fuzz_config.py``):
``id2label: 5`` or ``torch_dtype: "int99"`` raise ``AttributeError``, a 100,000-deep JSON array
``RecursionError``, a top-level ``null`` ``TypeError``, and a wrong field type the
``huggingface_hub`` strict-dataclass error, which is not a ``ValueError``. A config of another
model (``model_type`` "vqgan" read by ``DalleBartConfig.from_pretrained``) only logs a warning
and builds a default config of the wrong model. :class:`CheckedConfigMixin` turns all of these
into a ``ValueError`` (``OSError`` for an unreadable file) that names the class, the key and the
fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from huggingface_hub.errors import StrictDataclassError

# what transformers and our configs raise on bad values: re-raised as ValueError with context
_BAD_VALUE_ERRORS = (StrictDataclassError, TypeError, ValueError, AttributeError, KeyError, IndexError,
                     OverflowError, RecursionError)

# the values a config.json's "dtype" / "torch_dtype" may hold (transformers looks them up on torch)
_DTYPE_NAMES = frozenset({
    "auto", "float32", "float16", "bfloat16", "float64", "float", "half", "double", "int8", "uint8", "int16",
    "int32", "int64", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
})


class CheckedConfigMixin:
  """Mixed into our ``PreTrainedConfig`` subclasses (before it): strict ``from_dict`` / ``from_pretrained``.

  ``model_type`` of a dict may be missing (legacy files) or equal to the class's own;
  ``_accepted_model_types`` lists other values a subclass reads on purpose.
  """

  model_type: str
  _accepted_model_types: tuple[str, ...] = ()
  # a pipeline folder's composite config ("dalle-mini") holds this class's config under this key
  _pipeline_key: str | None = None

  @classmethod
  def from_dict(cls, config_dict: Any, **kwargs: Any) -> Any:
    if not isinstance(config_dict, Mapping):
      raise ValueError(
          f"a {cls.__name__} is built from a JSON object (a dict), got {type(config_dict).__name__}; "
          "the config.json is damaged or is not a config file"
      )
    model_type = config_dict.get("model_type", cls.model_type)
    if model_type == "dalle-mini" and cls._pipeline_key and isinstance(config_dict.get(cls._pipeline_key), Mapping):
      config_dict = config_dict[cls._pipeline_key]
      model_type = config_dict.get("model_type", cls.model_type)
    if model_type != cls.model_type and model_type not in cls._accepted_model_types:
      expected = (cls.model_type, *cls._accepted_model_types)
      raise ValueError(
          f"config has model_type {model_type!r}, but {cls.__name__} reads model_type "
          f"{' or '.join(map(repr, expected))}; point at the folder of a {cls.__name__} (a pipeline "
          "folder keeps its VQGAN under vqgan/) or use the class that matches this config"
      )
    for key in ("dtype", "torch_dtype"):
      value = config_dict.get(key)
      if value is not None and not (isinstance(value, str) and value in _DTYPE_NAMES):
        raise ValueError(
            f"invalid {cls.__name__}: {key} must be null or a dtype name such as 'float32' or 'bfloat16', "
            f"got {value!r}"
        )
    try:
      return super().from_dict(dict(config_dict), **kwargs)  # type: ignore[misc]
    except _BAD_VALUE_ERRORS as e:
      raise ValueError(f"invalid {cls.__name__}: {_one_line(e)}") from e

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
    try:
      return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)  # type: ignore[misc]
    except RecursionError as e:  # json's decoder on very deep nesting
      raise OSError(
          f"the config.json of {str(pretrained_model_name_or_path)!r} nests too deeply to be a config "
          "(a damaged or hostile file); re-download it"
      ) from e
    except ValueError:
      raise
    except _BAD_VALUE_ERRORS as e:
      raise ValueError(
          f"could not read a {cls.__name__} from {str(pretrained_model_name_or_path)!r}: {_one_line(e)}"
      ) from e


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text[:500] + ("..." if len(text) > 500 else "")


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
  """Raises ValueError unless every named attribute is an int >= 1."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_rates(config: Any, names: tuple[str, ...]) -> None:
  """Raises ValueError unless every named attribute is a number in [0, 1)."""
  for name in names:
    value = getattr(config, name)
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
      raise ValueError(f"{name} must be a rate in [0, 1), got {value!r}")


def check_finite_positive(config: Any, names: tuple[str, ...], *, allow_zero: bool = False) -> None:
  """Raises ValueError unless every named attribute is a finite number > 0 (>= 0 with allow_zero)."""
  for name in names:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
      raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")


__all__ = ["CheckedConfigMixin", "check_finite_positive", "check_positive_ints", "check_rates"]
