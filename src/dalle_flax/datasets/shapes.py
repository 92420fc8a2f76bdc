"""A procedural captioned-shapes dataset for training and evaluating small text-to-image models.

Example: ``write_dataset("shapes-train", 20_000, seed=0)`` writes 20k 64x64 PNGs and a
``metadata.jsonl`` that ``dalle_flax.training.sources.open_source`` reads as an imagefolder; or
``python -m dalle_flax.datasets.shapes --out shapes-train --num 20000 --seed 0``.

A :class:`Scene` is a background colour and one or two :class:`ShapeSpec` (shape, colour, size,
position) drawn from the vocabulary below. Scenes and captions are deterministic in the seed (numpy
and PIL only). A fixed 10% of the (colour, shape, position) triples, :data:`HELD_OUT`, never occur
in training scenes; eval scenes are single shapes of those triples only, so an eval measures
compositional generalisation: every colour, shape and position, and every pair of them, is still
seen in training in other combinations. ``dalle_flax.datasets.shapes_check`` scores images of eval
prompts against their scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ANCHORS", "COLOURS", "EXTENTS", "HELD_OUT", "POSITIONS", "SHAPES", "SIZES", "SPLITS",
    "Scene", "ShapeSpec", "caption", "eval_caption", "eval_prompts", "is_held_out", "main",
    "render", "sample_scenes", "shape_mask", "write_dataset",
]

# --- vocabulary ---------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "orange": (255, 128, 0),
    "purple": (128, 0, 128),
    "pink": (255, 105, 180),
    "gray": (128, 128, 128),
}
"""Colour name -> RGB; every pair is at least 127 apart (RGB Euclidean distance)."""
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "centre")
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
"""Position -> (x, y) of the shape's box centre, as fractions of the image side."""
EXTENTS: dict[str, float] = {"small": 0.22, "big": 0.40}
"""Size -> side of the shape's bounding box, as a fraction of the image side."""
SPLITS = ("train", "eval")

# Caption words: each vocabulary word and its synonyms (the first is the canonical eval word).
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
COLOUR_WORDS = {name: (name,) for name in COLOURS} | {"gray": ("gray", "grey")}
POSITION_PHRASES = {
    "left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
    "bottom": ("at the bottom",),
    "centre": ("in the centre", "in the center", "in the middle"),
}
_TEMPLATES = (  # {objects}: "a big red star on the left" (joined with " and "); {bg}: a colour
    "{objects}, on {a_bg} background",
    "{bg} background with {objects}",
    "{objects} on {a_bg} background",
    "{objects} of {a_bg} image",
    "an image of {objects} with {a_bg} background",
    "{objects}; the background is {bg}",
    "{a_bg} picture with {objects}",
    "there is {objects} on {a_bg} background",
)
_EVAL_TEMPLATE = _TEMPLATES[0]
_MARGIN = 0.02  # smallest gap (fraction of the side) between the boxes of two shapes in a scene


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """One shape of a scene: a ``SHAPES`` name, a ``COLOURS`` name, a ``SIZES`` and a ``POSITIONS``."""

  shape: str
  colour: str
  size: str
  position: str

  def __post_init__(self):
    for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                  ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
      if value not in allowed:
        raise ValueError(f"ShapeSpec {field} must be one of {list(allowed)}, got {value!r}")

  @property
  def triple(self) -> tuple[str, str, str]:
    """(colour, shape, position): the unit of the held-out split."""
    return self.colour, self.shape, self.position


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background colour name and one or two shapes at different, non-overlapping positions."""

  background: str
  shapes: tuple[ShapeSpec, ...]

  def __post_init__(self):
    if self.background not in COLOURS:
      raise ValueError(f"Scene background must be one of {list(COLOURS)}, got {self.background!r}")
    if not 1 <= len(self.shapes) <= 2:
      raise ValueError(f"a Scene holds 1 or 2 shapes, got {len(self.shapes)}")
    for spec in self.shapes:
      if spec.colour == self.background:
        raise ValueError(f"shape colour {spec.colour!r} equals the background; pick another colour")
    if len(self.shapes) == 2 and _overlap(*self.shapes):
      raise ValueError(f"shapes {self.shapes[0]} and {self.shapes[1]} overlap; use opposite "
                       "positions (left/right, top/bottom) or two small shapes")

  def to_dict(self) -> dict:
    """JSON-ready attributes: ``{"background": ..., "shapes": [{"shape": ..., ...}, ...]}``."""
    return {"background": self.background, "shapes": [dataclasses.asdict(s) for s in self.shapes]}

  @classmethod
  def from_dict(cls, data: dict) -> Scene:
    """Inverse of :meth:`to_dict`."""
    return cls(data["background"], tuple(ShapeSpec(**s) for s in data["shapes"]))


def _overlap(a: ShapeSpec, b: ShapeSpec) -> bool:
  """Whether the bounding boxes of ``a`` and ``b`` (plus a margin) intersect."""
  (ax, ay), (bx, by) = ANCHORS[a.position], ANCHORS[b.position]
  reach = (EXTENTS[a.size] + EXTENTS[b.size]) / 2 + _MARGIN
  return abs(ax - bx) < reach and abs(ay - by) < reach


# --- held-out split -----------------------------------------------------------------------------
def _choose_held_out(count: int = 30, seed: int = 1234) -> frozenset[tuple[str, str, str]]:
  """``count`` (colour, shape, position) triples from a fixed permutation, taken greedily so they
  are balanced (3 per colour, 5 per shape, 6 per position) and every (colour, shape),
  (colour, position) and (shape, position) pair keeps most of its triples in training (at most 2
  of 5, 3 of 6 and 4 of 10 held out)."""
  triples = list(itertools.product(COLOURS, SHAPES, POSITIONS))
  # Which fields of the triple -> the most held-out triples sharing those fields.
  limits = {(0,): 3, (1,): 5, (2,): 6, (0, 1): 2, (0, 2): 3, (1, 2): 4}
  taken: dict[tuple, int] = {}
  chosen = []
  for index in np.random.default_rng(seed).permutation(len(triples)):
    triple = triples[index]
    keys = [(fields, tuple(triple[f] for f in fields)) for fields in limits]
    if all(taken.get(key, 0) < limits[key[0]] for key in keys):
      chosen.append(triple)
      for key in keys:
        taken[key] = taken.get(key, 0) + 1
  if len(chosen) != count:  # only if the vocabulary or the limits change
    raise RuntimeError(f"held-out selection found {len(chosen)} triples, expected {count}")
  return frozenset(chosen)


HELD_OUT: frozenset[tuple[str, str, str]] = _choose_held_out()
"""The 30 (colour, shape, position) triples (10% of 300) kept out of training scenes."""
_HELD_OUT_SORTED = tuple(sorted(HELD_OUT))
_TRAIN_TRIPLES = tuple(t for t in itertools.product(COLOURS, SHAPES, POSITIONS) if t not in HELD_OUT)


def is_held_out(spec: ShapeSpec | tuple[str, str, str]) -> bool:
  """Whether a shape (or a (colour, shape, position) triple) belongs to the held-out split."""
  return (spec.triple if isinstance(spec, ShapeSpec) else tuple(spec)) in HELD_OUT


# --- sampling -----------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def _background(rng: np.random.Generator, used: set[str]) -> str:
  return _pick(rng, [c for c in COLOURS if c not in used])


def _has_room(size: str, position: str) -> bool:
  """Whether some second shape fits beside a ``size`` shape at ``position`` (not a big centre one)."""
  first = ShapeSpec(SHAPES[0], "red", size, position)
  return any(not _overlap(first, ShapeSpec(SHAPES[0], "red", s, p))
             for s, p in itertools.product(SIZES, POSITIONS))


_ROOM = {(s, p): _has_room(s, p) for s, p in itertools.product(SIZES, POSITIONS)}


def sample_scenes(n: int, seed: int, split: str = "train",
                  two_shape_prob: float = 0.0) -> list[Scene]:
  """``n`` scenes, the same for the same arguments.

  Args:
    n: how many scenes.
    seed: any int; each split draws from its own stream.
    split: "train" (shapes of triples outside :data:`HELD_OUT`, uniformly) or "eval" (one shape of
      a held-out triple; the triples cycle through fresh shuffles so each appears about equally).
    two_shape_prob: chance of a second shape in a train scene (a different, non-overlapping
      position, still outside :data:`HELD_OUT`); a big shape in the centre leaves no room, so it
      stays alone. Must be 0 for eval.

  Returns:
    The scenes; shape colours always differ from the background.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
  if not 0.0 <= two_shape_prob <= 1.0:
    raise ValueError(f"two_shape_prob must be in [0, 1], got {two_shape_prob!r}")
  if split == "eval" and two_shape_prob:
    raise ValueError(f"eval scenes have one shape; got two_shape_prob={two_shape_prob!r}, pass 0")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  scenes = []
  if split == "eval":
    order: list[tuple[str, str, str]] = []
    for _ in range(n):
      if not order:
        order = [_HELD_OUT_SORTED[i] for i in rng.permutation(len(_HELD_OUT_SORTED))]
      colour, shape, position = order.pop()
      spec = ShapeSpec(shape, colour, _pick(rng, SIZES), position)
      scenes.append(Scene(_background(rng, {colour}), (spec,)))
    return scenes
  for _ in range(n):
    colour, shape, position = _pick(rng, _TRAIN_TRIPLES)
    specs = [ShapeSpec(shape, colour, _pick(rng, SIZES), position)]
    if two_shape_prob and rng.random() < two_shape_prob and _ROOM[specs[0].size, position]:
      while True:  # rejection: about 1 in 4 draws fits
        colour, shape, position = _pick(rng, _TRAIN_TRIPLES)
        other = ShapeSpec(shape, colour, _pick(rng, SIZES), position)
        if not _overlap(specs[0], other):
          break
      specs.append(other)
    scenes.append(Scene(_background(rng, {s.colour for s in specs}), tuple(specs)))
  return scenes


# --- captions -----------------------------------------------------------------------------------
def _article(word: str) -> str:
  return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


OMIT_PROB = 0.25
"""Chance that a random caption leaves out a shape's size word, and (separately) its position
phrase: users write "a green triangle on a white background" as often as the full description."""


def _objects(scene: Scene, choose, omit=lambda: False) -> str:
  phrases = []
  for s in scene.shapes:
    words = [] if omit() else [choose(SIZE_WORDS[s.size])]
    words += [choose(COLOUR_WORDS[s.colour]), s.shape]
    if not omit():
      words.append(choose(POSITION_PHRASES[s.position]))
    phrases.append(_article(" ".join(words)))
  return " and ".join(phrases)


def _fill(template: str, scene: Scene, choose, omit=lambda: False) -> str:
  bg = choose(COLOUR_WORDS[scene.background])
  return template.format(objects=_objects(scene, choose, omit), bg=bg, a_bg=_article(bg))


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """A lowercase English caption of ``scene``: a random template and random synonyms.

  Every caption names the background colour and, for each shape in order, its colour and shape,
  with its size word and position phrase each left out with probability :data:`OMIT_PROB`, as
  "a big red star on the left" or "a red star" (joined by " and " for two shapes).
  """
  return _fill(_pick(rng, _TEMPLATES), scene, lambda words: _pick(rng, words),
               lambda: bool(rng.random() < OMIT_PROB))


def eval_caption(scene: Scene) -> str:
  """The canonical caption of eval prompts: "a big red star on the left, on a blue background"."""
  return _fill(_EVAL_TEMPLATE, scene, lambda words: words[0])


def eval_prompts(n: int = 200, seed: int = 0) -> list[tuple[str, Scene]]:
  """``n`` (canonical caption, scene) pairs of single-shape held-out eval scenes."""
  return [(eval_caption(scene), scene) for scene in sample_scenes(n, seed, split="eval")]


# --- rendering ----------------------------------------------------------------------------------
def _unit_polygon(shape: str) -> np.ndarray:
  """(k, 2) outline of ``shape`` in a box spanning [-0.5, 0.5]^2 (y down), touching all sides."""
  if shape == "square":
    points = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
  elif shape == "triangle":
    points = [(0, -1), (1, 1), (-1, 1)]
  elif shape == "star":
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
  elif shape == "heart":
    t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
    points = np.stack([16 * np.sin(t) ** 3,
                       -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                      axis=1)
  elif shape == "cross":
    a = 0.34  # half the arm thickness, relative to the half side
    points = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
              (-1, a), (-1, -a), (-a, -a)]
  else:
    raise ValueError(f"no polygon for shape {shape!r}; expected one of {list(SHAPES)}")
  points = np.asarray(points, np.float64)
  low, high = points.min(axis=0), points.max(axis=0)
  return (points - (low + high) / 2) / (high - low)  # centred, each side spanning exactly 1


_POLYGONS = {shape: _unit_polygon(shape) for shape in SHAPES if shape != "circle"}


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], across: float,
          fill) -> None:
  """Draws ``shape`` with box side ``across`` centred at ``centre`` (pixels)."""
  cx, cy = centre
  if shape == "circle":
    r = across / 2
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  else:
    points = _POLYGONS[shape] * across + (cx, cy)
    draw.polygon([tuple(p) for p in points], fill=fill)


_SUPERSAMPLE = 4


def render(scene: Scene, size: int = 64) -> Image.Image:
  """A ``size`` x ``size`` RGB image of ``scene``, drawn at 4x and box-downsampled (anti-aliased)."""
  big = size * _SUPERSAMPLE
  image = Image.new("RGB", (big, big), COLOURS[scene.background])
  draw = ImageDraw.Draw(image)
  for spec in scene.shapes:
    x, y = ANCHORS[spec.position]
    _draw(draw, spec.shape, (x * big, y * big), EXTENTS[spec.size] * big, COLOURS[spec.colour])
  return image.resize((size, size), Image.Resampling.BOX)


def shape_mask(shape: str, size_name: str, centre: tuple[float, float] | str,
               size: int = 64) -> np.ndarray:
  """(size, size) float32 coverage in [0, 1] of one shape as :func:`render` draws it.

  ``centre`` is a ``POSITIONS`` name or an (x, y) box centre in fractions of the side.
  """
  x, y = ANCHORS[centre] if isinstance(centre, str) else centre
  big = size * _SUPERSAMPLE
  image = Image.new("L", (big, big), 0)
  _draw(ImageDraw.Draw(image), shape, (x * big, y * big), EXTENTS[size_name] * big, 255)
  return np.asarray(image.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


# --- writing ------------------------------------------------------------------------------------
def write_dataset(out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train",
                  size: int = 64, two_shape_prob: float = 0.0, overwrite: bool = False) -> Path:
  """Writes ``n`` scenes as a Hugging Face imagefolder and returns its path.

  Layout: ``00000000.png``, ... and ``metadata.jsonl`` with one line per image:
  ``{"file_name", "text", "background", "shapes": [{"shape", "colour", "size", "position"}]}``
  (captions from :func:`caption`; eval datasets use the canonical :func:`eval_caption`). The
  folder is built beside ``out_dir`` and renamed into place at the end, so a crash leaves no
  half-written dataset.

  Raises:
    FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is False.
  """
  out = Path(out_dir).resolve()
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"out_dir {str(out)!r} is a file; expected a new or empty folder")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"out_dir {str(out)!r} exists and is not empty; pick a new folder or "
                          "pass overwrite=True (--overwrite) to replace it")
  scenes = sample_scenes(n, seed, split, two_shape_prob)
  rng = np.random.default_rng([seed, SPLITS.index(split), 1])  # captions: their own stream
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    lines = []
    for i, scene in enumerate(scenes):
      name = f"{i:08d}.png"
      render(scene, size).save(tmp / name, compress_level=1)
      text = eval_caption(scene) if split == "eval" else caption(scene, rng)
      lines.append(json.dumps({"file_name": name, "text": text, **scene.to_dict()}))
    (tmp / "metadata.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    old = None
    if out.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
      os.replace(out, old / "data")
    os.replace(tmp, out)
    if old is not None:
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m dalle_flax.datasets.shapes --out DIR --num N [--seed S] [--split train|eval]``."""
  parser = argparse.ArgumentParser(prog="python -m dalle_flax.datasets.shapes",
                                   description="Write a procedural captioned-shapes imagefolder.")
  parser.add_argument("--out", required=True, help="new or empty output folder")
  parser.add_argument("--num", type=int, required=True, help="number of images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--split", choices=SPLITS, default="train")
  parser.add_argument("--size", type=int, default=64, help="image side in pixels")
  parser.add_argument("--two-shape-prob", type=float, default=0.0,
                      help="chance of a second shape per train image")
  parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    path = write_dataset(args.out, args.num, seed=args.seed, split=args.split, size=args.size,
                         two_shape_prob=args.two_shape_prob, overwrite=args.overwrite)
  except (ValueError, FileExistsError) as e:
    parser.exit(2, f"error: {e}\n")
  print(f"wrote {args.num} {args.split} images to {path} in {time.perf_counter() - start:.1f}s",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
