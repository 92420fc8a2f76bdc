"""Scores a text-to-image pipeline on the held-out shapes eval prompts, per guidance setting.

Example::

    python scripts/evaluate_shapes.py --model runs/shapes/export --num-prompts 200 \\
        --guidance 1,3,default --out results.json --grid grid.png

Each prompt of ``dalle_flax.datasets.eval_prompts(num_prompts, seed)`` gets one image (image i:
seed ``seed + i``, the same under every setting), read by ``dalle_flax.datasets.check_image``.
Prints ``{setting: accuracies}`` as JSON (settings: the numbers given, "default" for the model's
generation config); ``--grid`` writes the first 16 images of each setting, one block per setting
stacked top to bottom.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def _guidance_settings(text: str) -> list[tuple[str, float | None]]:
  """"1,3,default" -> [("1", 1.0), ("3", 3.0), ("default", None)]."""
  settings = []
  for part in (p.strip() for p in text.split(",")):
    if part.lower() in ("default", "none"):
      settings.append(("default", None))
      continue
    try:
      value = float(part)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected comma-separated numbers or 'default', got {part!r} in {text!r}") from None
    settings.append((f"{value:g}", value))
  return settings


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default=None,
                      help="pipeline folder or Hub id (default: dalle_flax.cli.default_model(), the bundled model)")
  parser.add_argument("--num-prompts", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0, help="prompt seed and base image seed")
  parser.add_argument("--guidance", type=_guidance_settings, default=_guidance_settings("1,default"),
                      help="comma-separated guidance scales; 'default' uses the model's config")
  parser.add_argument("--batch-size", type=int, default=None, help="images per generate call")
  parser.add_argument("--out", type=Path, default=None, help="also write the results JSON here")
  parser.add_argument("--grid", type=Path, default=None, help="write a PNG of the first 16 images")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.num_prompts < 1:
    raise SystemExit(f"--num-prompts must be >= 1, got {args.num_prompts}")
  import dalle_flax  # slow imports after argument checks
  from dalle_flax.cli import default_model
  from dalle_flax.datasets import eval_prompts, evaluate
  from dalle_flax.pipelines import grid_shape

  model = args.model or default_model()
  if model is None:
    raise SystemExit("no --model given and no bundled model in this install; pass --model PATH")
  pipe = dalle_flax.pipeline("text-to-image", model=model)
  prompts = eval_prompts(args.num_prompts, seed=args.seed)
  results, shown = {}, []
  for name, scale in args.guidance:
    result = evaluate(pipe, prompts, guidance_scale=scale, seed=args.seed,
                      batch_size=args.batch_size, return_images=True)
    shown += result.pop("images")[:16]
    results[name] = result
    print(f"guidance {name}: all {result['all']:.3f}", file=sys.stderr)
  text = json.dumps(results, indent=2)
  print(text)
  if args.out is not None:
    args.out.write_text(text + "\n", encoding="utf-8")
  if args.grid is not None:
    rows, cols = grid_shape(min(16, len(prompts)))
    grid = dalle_flax.make_image_grid(shown, rows * len(args.guidance), cols)
    grid.save(args.grid)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
