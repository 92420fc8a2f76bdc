"""Step 6 of ``scripts/train_shapes_model.py``: the trained pipeline -> the bundle folder.

``make_bundle(work, config)`` copies the exported pipeline of ``work/text`` (weights, VQGAN,
tokenizer, processor; no checkpoints) to ``work/bundle``, writes its generation defaults, scores
it with the shapes checker on held-out combinations (with and without guidance), draws its
training curves and an example grid, and writes its model card (``README.md``, also the source
of ``model_cards/dalle-flax-shapes.md``). Run alone: ``python scripts/bundle_shapes_model.py WORK``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageDraw

_PIPELINE_FILES = ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                   "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
EXAMPLE_PROMPTS = ["a red circle on a blue background", "a big yellow star in the centre, on a black background",
                   "a small green triangle on the left, on a white background",
                   "a purple heart at the top on an orange background", "a big white cross on a gray background",
                   "a small orange square at the bottom, on a green background",
                   "a pink star on the right, on a purple background", "a big blue heart on a yellow background"]
EVAL_PROMPTS, EVAL_SEED = 200, 0


def make_bundle(work: Path, config: dict, *, num_eval: int = EVAL_PROMPTS) -> Path:
  """Builds ``work/bundle`` (see the module docstring) and returns it."""
  from dalle_flax import pipeline
  from dalle_flax.datasets.shapes import eval_prompts
  from dalle_flax.datasets.shapes_check import evaluate
  from dalle_flax.image_utils import make_image_grid

  source, bundle = work / "text", work / "bundle"
  staging = work / "bundle.tmp"
  if staging.exists():
    shutil.rmtree(staging)
  staging.mkdir(parents=True)
  for name in _PIPELINE_FILES:
    if (source / name).is_file():
      shutil.copy2(source / name, staging / name)
  shutil.copytree(source / "vqgan", staging / "vqgan")
  (staging / "vqgan" / "README.md").unlink(missing_ok=True)
  generation = json.loads((staging / "generation_config.json").read_text())
  generation.update(config["generation"])
  (staging / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")

  # Scores on held-out (colour, shape, position) combinations, same prompts and seeds per setting.
  pipe = pipeline("text-to-image", model=str(staging))
  prompts = eval_prompts(num_eval, seed=EVAL_SEED)
  results = {}
  for name, scale in (("guided", None), ("unguided", 1.0)):
    scores = evaluate(pipe, prompts, guidance_scale=scale, seed=EVAL_SEED, batch_size=50)
    results[name] = {k: v for k, v in scores.items() if k != "images"}
  results["guidance_scale_default"] = config["generation"]["guidance_scale"]
  results["num_prompts"] = len(prompts)
  (staging / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")

  images = pipe(EXAMPLE_PROMPTS, seed=list(range(len(EXAMPLE_PROMPTS))))
  grid = make_image_grid([per_prompt[0] for per_prompt in images], rows=2, cols=4)
  grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(staging / "example_grid.png")
  plot_curves(work, staging / "training_curves.png")
  timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").is_file() else {}
  (staging / "README.md").write_text(model_card(work, config, results, timings))
  if bundle.exists():
    shutil.rmtree(bundle)
  staging.rename(bundle)
  return bundle


# --- the training curves, drawn with PIL (no plotting library needed) -----------------------------
def _series(path: Path, key: str) -> list[tuple[int, float]]:
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [(r["step"], r[key]) for r in rows if key in r]


def plot_curves(work: Path, out: Path) -> None:
  """Two panels: VQGAN loss (train, eval) and DalleBart loss (train, eval) against steps."""
  panels = [("VQGAN loss", work / "vqgan" / "metrics.jsonl"), ("DalleBart loss", work / "text" / "metrics.jsonl")]
  width, height, pad = 420, 260, 40
  canvas = Image.new("RGB", (width * len(panels), height), "white")
  draw = ImageDraw.Draw(canvas)
  for k, (title, path) in enumerate(panels):
    series = {"train": _series(path, "loss"), "eval": _series(path, "eval_loss")}
    values = [v for s in series.values() for _, v in s]
    steps = [x for s in series.values() for x, _ in s]
    if not values:
      continue
    x0, y0, x1, y1 = k * width + pad, pad // 2, (k + 1) * width - pad // 2, height - pad
    low, high = min(values), max(values)
    top = max(steps)

    def point(step: float, value: float, low: float = low, high: float = high, top: int = top,
              x0: int = x0, y0: int = y0, x1: int = x1, y1: int = y1) -> tuple[float, float]:
      return (x0 + (x1 - x0) * step / top, y1 - (y1 - y0) * (value - low) / max(high - low, 1e-9))

    draw.rectangle([x0, y0, x1, y1], outline="black")
    for name, colour in (("train", (31, 119, 180)), ("eval", (214, 39, 40))):
      points = [point(x, v) for x, v in series[name]]
      if len(points) > 1:
        draw.line(points, fill=colour, width=2)
      for p in points if name == "eval" else ():
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    draw.text((x0 + 5, y0 + 3), f"{title}: train (blue), eval (red)", fill="black")
    draw.text((x0, y1 + 4), "0", fill="black")
    draw.text((x1 - 40, y1 + 4), f"{top} steps", fill="black")
    draw.text((x0 - 35, y0), f"{high:.2f}", fill="black")
    draw.text((x0 - 35, y1 - 10), f"{low:.2f}", fill="black")
  canvas.save(out)


# --- the model card -------------------------------------------------------------------------------
def _last(path: Path, key: str) -> float | None:
  series = _series(path, key)
  return series[-1][1] if series else None


def model_card(work: Path, config: dict, results: dict, timings: dict) -> str:
  def pct(name: str, attr: str) -> str:
    return f"{100 * results[name][attr]:.1f}%"

  rows = "\n".join(f"| {label} | " + " | ".join(pct(name, attr) for attr in ("background", "colour", "shape",
                                                                               "position", "all")) + " |"
                   for label, name in ((f"guidance {results['guidance_scale_default']} (default)", "guided"),
                                       ("no guidance (scale 1)", "unguided")))
  vq, text, data = config["vqgan_config"], config["text_config"], config["data"]
  minutes = {k: f"{v / 60:.1f}" for k, v in timings.items()}
  vq_metrics, text_metrics = work / "vqgan" / "metrics.jsonl", work / "text" / "metrics.jsonl"
  return f"""---
library_name: dalle-flax
pipeline_tag: text-to-image
license: apache-2.0
tags:
- dalle-flax
- text-to-image
- jax
- flax
---

# dalle-flax shapes: the bundled default model

A small DALL·E mini (DalleBart + VQGAN) trained from scratch with dalle-flax's own `train-vqgan`,
`encode` and `train` on a procedural dataset of coloured shapes. It ships inside the `dalle-flax`
package and is the default of `dalle-flax generate`, `dalle-flax serve` and
`dalle_flax.pipeline("text-to-image")`, so everything works offline. It draws one shape (circle,
square, triangle, star, heart, cross) of a named colour and size at a position, on a background
colour: "a small red circle on the left, on a blue background".

![example grid](example_grid.png)

## Evaluation

{results['num_prompts']} prompts of (colour, shape, position) combinations held out of training, one image
each (seed = prompt index), scored by `dalle_flax.datasets.shapes_check` (background colour from
the border, shape colour from the foreground mask, shape by template IoU, position by the
mask's centroid): `python scripts/evaluate_shapes.py`.

| setting | background | shape colour | shape | position | all four |
|---|---|---|---|---|---|
{rows}

## Model

- VQGAN: {vq['resolution']}x{vq['resolution']} images -> {vq['resolution'] // 2 ** (len(vq['ch_mult']) - 1)}x{vq['resolution'] // 2 ** (len(vq['ch_mult']) - 1)} codes from a {vq['n_embed']}-entry codebook
  (ch {vq['ch']}, ch_mult {vq['ch_mult']}, {vq['num_res_blocks']} res block per level, {vq['embed_dim']}-d codes).
- DalleBart: d_model {text['d_model']}, {text['encoder_layers']} encoder / {text['decoder_layers']} decoder layers, {text['encoder_attention_heads']} heads, GLU FFN {text['encoder_ffn_dim']},
  {text['max_text_length']} text tokens (a {config['tokenizer']['vocab_size']}-token byte-level BPE trained on the captions).
- Generation defaults (`generation_config.json`): guidance scale {config['generation']['guidance_scale']}, top-k
  {config['generation']['top_k']}, temperature {config['generation']['temperature']}.

## Training

Recipe: `python scripts/train_shapes_model.py` (every setting and seed in its `CONFIG`), on a
2-core CPU: data {minutes.get('data', '?')} min, VQGAN {minutes.get('vqgan', '?')} min, encode
{minutes.get('encode', '?')} min, DalleBart {minutes.get('text', '?')} min.

- Data: {data['train']} training scenes (`dalle_flax.datasets.shapes`, seed {data['train_seed']}), one shape each, captions from
  several templates with synonyms; {data['eval']} eval scenes of held-out combinations only.
- VQGAN: {config['vqgan']['max_steps']} steps x {config['vqgan']['train_batch_size']} images, AdamW lr {config['vqgan']['learning_rate']} (cosine), {config['vqgan']['reconstruction'].upper()}
  reconstruction + codebook + 0.25 commitment, dead-code restarts every {config['vqgan']['restart_steps']} steps; final eval
  PSNR {_fmt(_last(vq_metrics, 'eval_psnr'))} dB, {_fmt(_last(vq_metrics, 'eval_codes_used'))} codes used on the eval images.
- DalleBart: {config['text']['max_steps']} steps x {config['text']['train_batch_size']}, AdamW lr {config['text']['learning_rate']} (warmup {config['text']['warmup_steps']},
  cosine), {config['text']['blank_caption_prob']} blank captions (for guidance); final train loss
  {_fmt(_last(text_metrics, 'loss'))}, held-out eval loss {_fmt(_last(text_metrics, 'eval_loss'))}, eval token accuracy
  {_fmt(_last(text_metrics, 'eval_accuracy'))}.

![training curves](training_curves.png)

## Limits

Only this toy world: the ten colours, six shapes, two sizes and five positions of the
renderer, one shape per image, 64x64 pixels. Shapes are the weak point: with an 8x8 code grid
the decoder draws soft blobs, and the checker reads the intended shape far less often than the
colours, background and position (see Evaluation; chance is 1/6). Other words are ignored or give arbitrary shapes.
Colour names outside the ten and two-object prompts are not understood. It shows that the
training path works end to end; for real pictures load `dalle-mini/dalle-mini`.
"""


def _fmt(value: float | None) -> str:
  return "-" if value is None else f"{value:.3g}"


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  from train_shapes_model import CONFIG

  print(make_bundle(Path(sys.argv[1]), CONFIG))
