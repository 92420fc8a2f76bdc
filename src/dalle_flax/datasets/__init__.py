"""Procedural datasets: captioned shapes for training and evaluating small text-to-image models.

Example: ``write_dataset("shapes-train", 20_000, seed=0)``; ``score(images, scenes)`` for
images generated from ``eval_prompts()``.

Names load on first use, so ``python -m dalle_flax.datasets.shapes`` runs the module fresh.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shapes": ("COLOURS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Scene", "ShapeSpec",
               "caption", "eval_caption", "eval_prompts", "is_held_out", "render",
               "sample_scenes", "write_dataset"),
    "shapes_check": ("Prediction", "check_image", "evaluate", "score"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "COLOURS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "Prediction", "Scene", "ShapeSpec",
    "caption", "check_image", "eval_caption", "eval_prompts", "evaluate", "is_held_out", "render",
    "sample_scenes", "score", "write_dataset",
]


def __getattr__(name: str) -> Any:
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
