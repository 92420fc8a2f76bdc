"""Procedural datasets: captioned shapes for training and evaluating small text-to-image models.

Example: ``write_dataset("shapes-train", 20_000, seed=0)``; ``score(images, scenes)`` for
images generated from ``eval_prompts()``.
"""

from .shapes import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
    caption,
    eval_caption,
    eval_prompts,
    is_held_out,
    render,
    sample_scenes,
    write_dataset,
)
from .shapes_check import Prediction, check_image, evaluate, score

__all__ = [
    "COLOURS",
    "HELD_OUT",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Prediction",
    "Scene",
    "ShapeSpec",
    "caption",
    "check_image",
    "eval_caption",
    "eval_prompts",
    "evaluate",
    "is_held_out",
    "render",
    "sample_scenes",
    "score",
    "write_dataset",
]
