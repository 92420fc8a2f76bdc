"""The procedural shapes dataset (dalle_flax.datasets.shapes) and its checker (shapes_check)."""

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle_flax.datasets import shapes, shapes_check
from dalle_flax.datasets.shapes import (
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
)
from dalle_flax.training.sources import open_source

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"

# --- caption parsing with the vocabulary and its synonyms ---------------------------------------
_SIZE = {w: s for s, words in shapes.SIZE_WORDS.items() for w in words}
_COLOUR = {w: c for c, words in shapes.COLOUR_WORDS.items() for w in words}
_POSITION = {w: p for p, words in shapes.POSITION_PHRASES.items() for w in words}
_OBJECT = re.compile(rf"\ban? (?:({'|'.join(_SIZE)}) )?({'|'.join(_COLOUR)}) ({'|'.join(SHAPES)})"
                     rf"(?: ({'|'.join(_POSITION)}))?\b")


def parse_caption(text: str) -> tuple[str, list[tuple]]:
  """(background, [(size or None, colour, shape, position or None)]) read with the vocabulary alone."""
  objects = [(_SIZE.get(m[1]), _COLOUR[m[2]], m[3], _POSITION.get(m[4])) for m in _OBJECT.finditer(text)]
  rest = _OBJECT.sub(" ", text)
  colours = [_COLOUR[w] for w in re.findall(r"[a-z]+", rest) if w in _COLOUR]
  assert len(colours) == 1, f"expected one background colour outside the objects in {text!r}"
  assert re.search(r"\b(background|image|picture)\b", rest), text
  return colours[0], objects


def describes(text: str, scene: Scene, *, complete: bool = False) -> bool:
  """The caption names the scene's background and each shape's colour and shape, in order, and
  any size or position it names is the scene's (``complete``: it names them all)."""
  background, objects = parse_caption(text)
  if background != scene.background or len(objects) != len(scene.shapes):
    return False
  for (size, colour, shape, position), spec in zip(objects, scene.shapes):
    if (colour, shape) != (spec.colour, spec.shape) or (complete and None in (size, position)):
      return False
    if size not in (None, spec.size) or position not in (None, spec.position):
      return False
  return True


# --- vocabulary, scenes, rendering --------------------------------------------------------------
def test_vocabulary_is_complete_and_colours_are_far_apart():
  assert SHAPES == ("circle", "square", "triangle", "star", "heart", "cross")
  assert set(COLOURS) == {"red", "green", "blue", "yellow", "white", "black", "orange", "purple",
                          "pink", "gray"}
  assert SIZES == ("small", "big") and POSITIONS == ("left", "right", "top", "bottom", "centre")
  assert COLOURS["red"] == (255, 0, 0) and COLOURS["white"] == (255, 255, 255)
  distances = [np.linalg.norm(np.subtract(COLOURS[a], COLOURS[b]))
               for a, b in itertools.combinations(COLOURS, 2)]
  assert min(distances) >= 120


def test_render_draws_each_shape_inside_the_image_at_its_anchor():
  for shape, size, position in itertools.product(SHAPES, SIZES, POSITIONS):
    image = shapes.render(Scene("blue", (ShapeSpec(shape, "yellow", size, position),)))
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert (border == COLOURS["blue"]).all(), (shape, size, position)  # fully inside
    mask = np.linalg.norm(pixels.astype(float) - COLOURS["blue"], axis=-1) > 60
    ys, xs = np.nonzero(mask)
    box_centre = ((xs.min() + xs.max() + 1) / 128, (ys.min() + ys.max() + 1) / 128)
    np.testing.assert_allclose(box_centre, shapes.ANCHORS[position], atol=0.03)
    assert abs((xs.max() - xs.min() + 1) / 64 - shapes.EXTENTS[size]) < 0.05
  assert shapes.render(Scene("red", (ShapeSpec("star", "white", "big", "centre"),)), 96).size == (96, 96)


def test_scene_rejects_bad_values_with_the_allowed_ones():
  with pytest.raises(ValueError, match="shape must be one of"):
    ShapeSpec("hexagon", "red", "big", "left")
  with pytest.raises(ValueError, match="equals the background"):
    Scene("red", (ShapeSpec("star", "red", "big", "left"),))
  with pytest.raises(ValueError, match="overlap"):
    Scene("red", (ShapeSpec("star", "blue", "big", "left"), ShapeSpec("star", "blue", "big", "top")))
  with pytest.raises(ValueError, match="1 or 2 shapes"):
    Scene("red", ())
  Scene("red", (ShapeSpec("star", "blue", "big", "left"), ShapeSpec("cross", "blue", "big", "right")))


def test_sampling_is_deterministic_by_seed_and_split():
  assert shapes.sample_scenes(50, 3, two_shape_prob=0.5) == shapes.sample_scenes(50, 3, two_shape_prob=0.5)
  assert shapes.sample_scenes(50, 3) != shapes.sample_scenes(50, 4)
  assert shapes.eval_prompts(20, 1) == shapes.eval_prompts(20, 1)
  assert shapes.eval_prompts(20, 1) != shapes.eval_prompts(20, 2)
  with pytest.raises(ValueError, match="split must be one of"):
    shapes.sample_scenes(1, 0, split="test")


def test_two_shape_scenes_have_different_positions_and_disjoint_pixels():
  scenes = [s for s in shapes.sample_scenes(300, 0, two_shape_prob=1.0) if len(s.shapes) == 2]
  assert len(scenes) > 200  # only a big centre shape stays alone
  for scene in scenes[:40]:
    a, b = scene.shapes
    assert a.position != b.position and scene.background not in (a.colour, b.colour)
    masks = [shapes.shape_mask(s.shape, s.size, s.position) > 0 for s in scene.shapes]
    assert not (masks[0] & masks[1]).any(), scene


# --- captions -----------------------------------------------------------------------------------
def test_caption_names_background_and_every_shape_attribute():
  rng = np.random.default_rng(0)
  for scene in shapes.sample_scenes(400, 0, two_shape_prob=0.5):
    text = shapes.caption(scene, rng)
    assert text == text.lower()
    assert describes(text, scene), text
  for text, scene in shapes.eval_prompts(60):
    assert describes(text, scene, complete=True)
    assert text == shapes.eval_caption(scene)


def test_captions_vary_in_template_and_synonyms():
  rng = np.random.default_rng(0)
  scene = Scene("gray", (ShapeSpec("heart", "pink", "small", "centre"),))
  texts = {shapes.caption(scene, rng) for _ in range(400)}
  skeletons = {_OBJECT.sub("OBJ", t).replace("grey", "gray") for t in texts}
  assert len(skeletons) >= 6
  words = set(" ".join(texts).split())
  assert {"small", "little", "tiny", "centre", "center", "middle", "gray", "grey"} <= words
  assert shapes.eval_caption(scene) == "a small pink heart in the centre, on a gray background"
  parsed = [parse_caption(t)[1][0] for t in texts]
  no_size = sum(size is None for size, *_ in parsed) / len(parsed)
  no_position = sum(position is None for *_, position in parsed) / len(parsed)
  assert 0.15 < no_size < 0.35 and 0.15 < no_position < 0.35  # OMIT_PROB = 0.25 each
  assert any(size is None and position is None for size, *_, position in parsed)
  two = Scene("white", (ShapeSpec("circle", "red", "big", "left"),
                        ShapeSpec("square", "blue", "big", "right")))
  assert shapes.eval_caption(two) == ("a big red circle on the left and a big blue square on the "
                                      "right, on a white background")


# --- held-out split -----------------------------------------------------------------------------
def test_held_out_is_a_balanced_tenth_that_keeps_every_word_and_pair_in_training():
  assert len(HELD_OUT) == 30
  train = set(itertools.product(COLOURS, SHAPES, POSITIONS)) - HELD_OUT
  for index, vocabulary in enumerate((COLOURS, SHAPES, POSITIONS)):
    assert {t[index] for t in train} == set(vocabulary)
    counts = {w: sum(t[index] == w for t in HELD_OUT) for w in vocabulary}
    assert set(counts.values()) == {30 // len(vocabulary)}, counts
  for i, j in itertools.combinations(range(3), 2):  # each held-out pair is seen in training
    assert all(any((t[i], t[j]) == (h[i], h[j]) for t in train) for h in HELD_OUT)
  assert shapes.is_held_out(next(iter(HELD_OUT)))


def test_train_scenes_never_hold_held_out_triples_but_cover_the_vocabulary():
  scenes = shapes.sample_scenes(3000, 0, two_shape_prob=0.5)
  specs = [s for scene in scenes for s in scene.shapes]
  assert not any(shapes.is_held_out(s) for s in specs)
  assert {s.colour for s in specs} == set(COLOURS) and {s.shape for s in specs} == set(SHAPES)
  assert {s.position for s in specs} == set(POSITIONS) and {s.size for s in specs} == set(SIZES)
  assert {scene.background for scene in scenes} == set(COLOURS)


def test_eval_scenes_are_single_held_out_shapes_covering_the_split():
  scenes = shapes.sample_scenes(300, 0, split="eval")
  assert all(len(s.shapes) == 1 and shapes.is_held_out(s.shapes[0]) for s in scenes)
  assert {s.shapes[0].triple for s in scenes} == HELD_OUT
  assert {s.shapes[0].size for s in scenes} == set(SIZES)
  assert all(s.background != s.shapes[0].colour for s in scenes)
  with pytest.raises(ValueError, match="eval scenes have one shape"):
    shapes.sample_scenes(3, 0, split="eval", two_shape_prob=0.5)


# --- writing ------------------------------------------------------------------------------------
def _files(folder: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_dataset_is_byte_deterministic_and_reads_as_an_imagefolder(tmp_path):
  out = shapes.write_dataset(tmp_path / "a", 12, seed=5, two_shape_prob=0.5)
  again = shapes.write_dataset(tmp_path / "b", 12, seed=5, two_shape_prob=0.5)
  other = shapes.write_dataset(tmp_path / "c", 12, seed=6, two_shape_prob=0.5)
  assert _files(out) == _files(again)
  assert _files(out)["metadata.jsonl"] != _files(other)["metadata.jsonl"]
  assert sorted(_files(out)) == [f"{i:08d}.png" for i in range(12)] + ["metadata.jsonl"]
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left

  source = open_source(out)
  assert source.kind == "imagefolder" and source.caption_column == "text" and len(source.examples) == 12
  rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
  scenes = shapes.sample_scenes(12, 5, two_shape_prob=0.5)
  for example, row, scene in zip(source.examples, rows, scenes):
    assert Scene.from_dict(row) == scene
    assert describes(example.read_caption(), scene)
    image = example.open_image()
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(shapes.render(scene)))

  evals = shapes.write_dataset(tmp_path / "eval", 5, seed=0, split="eval", size=32)
  rows = [json.loads(line) for line in (evals / "metadata.jsonl").read_text().splitlines()]
  assert [r["text"] for r in rows] == [t for t, _ in shapes.eval_prompts(5, 0)]
  assert Image.open(evals / "00000000.png").size == (32, 32)


def test_write_dataset_refuses_a_non_empty_folder_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
  out = shapes.write_dataset(tmp_path / "data", 3)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    shapes.write_dataset(out, 4)
  assert len(list(out.glob("*.png"))) == 3
  shapes.write_dataset(out, 4, overwrite=True)
  assert len(list(out.glob("*.png"))) == 4
  (tmp_path / "empty").mkdir()
  shapes.write_dataset(tmp_path / "empty", 2)  # an empty folder is fine

  calls = []

  def failing_render(scene, size=64):
    calls.append(scene)
    if len(calls) == 3:
      raise RuntimeError("disk full")
    return Image.new("RGB", (size, size))

  monkeypatch.setattr(shapes, "render", failing_render)
  with pytest.raises(RuntimeError, match="disk full"):
    shapes.write_dataset(tmp_path / "broken", 5)
  with pytest.raises(RuntimeError, match="disk full"):
    calls.clear()
    shapes.write_dataset(out, 5, overwrite=True)
  assert not (tmp_path / "broken").exists()
  assert len(list(out.glob("*.png"))) == 4  # the old dataset is untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]


def test_main_writes_the_dataset_and_reports_errors(tmp_path, capsys):
  assert shapes.main(["--out", str(tmp_path / "d"), "--num", "3", "--seed", "1", "--split", "eval",
                      "--size", "32"]) == 0
  assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 3
  with pytest.raises(SystemExit) as exit_info:
    shapes.main(["--out", str(tmp_path / "d"), "--num", "3"])
  assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


# --- checker ------------------------------------------------------------------------------------
def test_checker_reads_clean_eval_renders_exactly():
  prompts = shapes.eval_prompts(300, seed=0)
  scenes = [scene for _, scene in prompts]
  result = shapes_check.score([shapes.render(s) for s in scenes], scenes)
  assert result["all"] == 1.0 and result["size"] == 1.0 and result["num_images"] == 300
  assert result["correct"]["all"] == 300 and result["num_empty"] == 0
  train = shapes.sample_scenes(200, 1)  # every shape at every position, not just held-out ones
  assert shapes_check.score([shapes.render(s) for s in train], train)["all"] == 1.0


def test_checker_tolerates_noise_blur_and_other_inputs():
  scenes = [scene for _, scene in shapes.eval_prompts(300, seed=1)]

  def degraded(radius):
    rng = np.random.default_rng(0)
    for scene in scenes:
      blurred = shapes.render(scene).filter(ImageFilter.GaussianBlur(radius))
      pixels = np.asarray(blurred, np.float32) / 255 + rng.normal(0, 0.03, (64, 64, 3))
      yield np.clip(pixels, 0, 1)  # float HWC in [0, 1]

  result = shapes_check.score(list(degraded(0.7)), scenes)
  assert result["all"] >= 0.95, result
  # A stronger blur still reads colours: they come from the shape's core, not its blended edge
  # (the median of every shape pixel gets about 94% here).
  assert shapes_check.score(list(degraded(1.0)), scenes)["colour"] >= 0.99
  scene = scenes[0]
  truth = scene.shapes[0]
  for image in (np.asarray(shapes.render(scene)),  # uint8
                np.asarray(shapes.render(scene), np.float32),  # floats in [0, 255]
                shapes.render(scene, 128)):  # resized to 64
    prediction = shapes_check.check_image(image)
    assert (prediction.background, prediction.colour, prediction.shape, prediction.position) == (
        scene.background, truth.colour, truth.shape, truth.position)


def test_checker_is_not_trivially_right():
  scene = Scene("blue", (ShapeSpec("star", "red", "big", "left"),))
  others = {
      "shape": Scene("blue", (ShapeSpec("circle", "red", "big", "left"),)),
      "colour": Scene("blue", (ShapeSpec("star", "yellow", "big", "left"),)),
      "position": Scene("blue", (ShapeSpec("star", "red", "big", "right"),)),
      "background": Scene("white", (ShapeSpec("star", "red", "big", "left"),)),
  }
  for differs, other in others.items():
    result = shapes_check.score([shapes.render(other)], [scene])
    for attribute in shapes_check.ATTRIBUTES:
      assert result[attribute] == (attribute != differs), (differs, attribute)
    assert result["all"] == 0.0
  blank = shapes_check.check_image(Image.new("RGB", (64, 64), COLOURS["blue"]))
  assert (blank.background, blank.shape, blank.colour, blank.position) == ("blue", None, None, None)
  empty = shapes_check.score([Image.new("RGB", (64, 64), COLOURS["blue"])], [scene])
  assert empty["num_empty"] == 1 and empty["background"] == 1.0 and empty["all"] == 0.0
  scenes = [s for _, s in shapes.eval_prompts(100, seed=2)]
  shuffled = [shapes.render(s) for s in scenes[1:] + scenes[:1]]  # each image of another scene
  assert shapes_check.score(shuffled, scenes)["all"] < 0.2
  with pytest.raises(ValueError, match="one image per scene"):
    shapes_check.score([], [scene])


def test_evaluate_runs_a_pipeline_and_returns_scores():
  import dalle_flax

  pipe = dalle_flax.pipeline("text-to-image", model=str(TINY))
  prompts = shapes.eval_prompts(4, seed=0)
  result = shapes_check.evaluate(pipe, prompts, guidance_scale=1.0, seed=7, batch_size=2,
                                 return_images=True)
  assert result["guidance_scale"] == 1.0 and result["seed"] == 7 and result["num_images"] == 4
  for key in (*shapes_check.ATTRIBUTES, "size", "all"):
    assert 0.0 <= result[key] <= 1.0 and 0 <= result["correct"][key] <= 4
  images = result.pop("images")
  assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
  json.dumps(result)
  same = pipe([prompts[1][0]], seed=[8], guidance_scale=1.0)[0][0]  # image i: seed + i
  assert np.array_equal(np.asarray(same), np.asarray(images[1]))
