"""The ``dalle-flax`` command line: generate images, convert checkpoints, serve the web demo.

Example: ``dalle-flax generate "an armchair in the shape of an avocado" --num-images 4 --grid``.

Commands::

  dalle-flax generate PROMPT [PROMPT ...] [--model M] [--vqgan V] [--revision R] [--num-images N]
      [--seed S] [--guidance-scale G] [--temperature T] [--top-k K] [--top-p P]
      [--negative-prompt NP] [--grid] [--seamless] [--batch-size B] [--out DIR]
      [--dtype {float32,bfloat16,float16}] [--no-progress]
  dalle-flax convert TEXT_MODEL [--vqgan V] [--revision R] [--vqgan-revision R] --out DIR
  dalle-flax serve [--model M ...] [--vqgan V] [--revision R] [--dtype D] [--host H] [--port P]
      [--max-queue Q] [--progress-every N]
  dalle-flax encode SOURCE --vqgan V --out DIR [--source-type T] [--batch-size B] [--shard-size S]
      [--min-size M] [--on-bad-image {skip,error}] [--push-to-hub REPO] [--no-progress]
  dalle-flax train [CONFIG.json|yaml] --model M --train-data DIR --output-dir DIR [--max-steps N] ...
  dalle-flax train-vqgan [CONFIG.json|yaml] --model VQGAN|config.json --train-data IMAGES --output-dir DIR ...

``generate`` writes one PNG per image (``<prompt>_<seed>.png``; one ``<prompt>_grid_<seed>.png``
per prompt with ``--grid``/``--seamless``) and prints their paths, one per line; rerun with
``--seed <seed> --num-images 1`` to get one image again. ``convert`` turns a released two-repo
checkpoint (text model + VQGAN, msgpack) into one safetensors pipeline folder. ``serve`` loads
the models once, prints the demo's URL and serves it (``dalle_flax.web``, FastAPI) until Ctrl-C.
``encode`` turns captioned images into the parquet shards fine-tuning reads
(``dalle_flax.training.encode``), prints a summary, and resumes when run again. ``train``
fine-tunes on those shards (``dalle_flax.training.train``; every ``TrainingArguments`` field is a
flag) and leaves a pipeline folder in ``--output-dir``; running it again resumes. ``train-vqgan``
trains a VQGAN on images the same way (``dalle_flax.training.train_vqgan``) and leaves a
``FlaxVQGANModel`` folder.

Errors (bad model path, unreachable Hub, bad values) print one line to stderr and exit with
status 1 (2 for bad command-line syntax); ``--traceback`` shows the full traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .bundled import BUNDLED_MODEL

if TYPE_CHECKING:
  from .pipelines import TextToImagePipeline

__all__ = ["BUNDLED_MODEL", "build_parser", "default_model", "main"]


def default_model() -> str | None:
  """The ``--model`` default: the bundled shapes pipeline (None if this installation lacks it)."""
  return str(BUNDLED_MODEL) if (BUNDLED_MODEL / "config.json").is_file() else None


# --- argument types: a bad value is an argparse error (exit 2) naming the flag -------------------
def _positive_int(text: str) -> int:
  value = _int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return value


def _non_negative_int(text: str) -> int:
  value = _int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
  return value


def _seed(text: str) -> int:
  value = _int(text)
  if not 0 <= value < 2**32:
    raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {text!r}")
  return value


def _int(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _finite_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def _positive_float(text: str) -> float:
  value = _finite_float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
  return value


def _bounded_int(flag: str, low: int, high: int):
  """An argparse type: an integer in [low, high]."""
  def parse(text: str) -> int:
    value = _int(text)
    if not low <= value <= high:
      raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {text!r}")
    return value

  parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in its errors
  return parse


def _probability(text: str) -> float:
  value = _finite_float(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  """The ``dalle-flax`` argument parser."""
  parser = argparse.ArgumentParser(
      prog="dalle-flax", description="DALL·E mini / mega text-to-image in JAX.")
  parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  default = default_model()
  default_help = (
      "the bundled shapes model (coloured shapes at 64x64, offline: 'a red circle on a blue "
      "background'); pass --model dalle-mini/dalle-mini for real pictures" if default else
      "none bundled with this installation; required")
  generate = commands.add_parser(
      "generate", help="generate images from prompts",
      description="Generate images and write them as PNG files; prints the paths written.")
  add = generate.add_argument
  add("prompts", nargs="+", metavar="PROMPT", help="one or more prompts")
  add("--model", default=default,
      help="pipeline folder or Hub repo id, or a text model repo such as dalle-mini/dalle-mini "
           f"(default: {default_help})")
  add("--vqgan", help="VQGAN repo id or folder (default: the model's own)")
  add("--revision", help="branch, tag or commit of --model")
  add("--num-images", type=_positive_int, default=1, help="images per prompt (default: 1)")
  add("--seed", type=_seed, help="seed of the first image (default: random; in the file names)")
  add("--guidance-scale", type=_finite_float,
      help="super-conditioning scale; the dalle-mini notebook used 10 (default: the model's)")
  add("--temperature", type=_positive_float, help="sampling temperature (default: the model's)")
  add("--top-k", type=_non_negative_int, help="sample among the k likeliest tokens; 0 disables")
  add("--top-p", type=_probability, help="nucleus sampling threshold in (0, 1]")
  add("--negative-prompt", help="replaces the empty prompt of guidance")
  add("--grid", action="store_true", help="one grid image per prompt")
  add("--seamless", action="store_true", help="one grid per prompt, decoded as one code map")
  add("--batch-size", type=_positive_int, help="most images per generate call (default: all)")
  add("--out", type=Path, default=Path("."), help="output folder (default: the current folder)")
  add("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
      help="computation dtype of the text model (default: float32)")
  add("--no-progress", action="store_true", help="no progress bar")
  generate.set_defaults(func=_generate)

  convert = commands.add_parser(
      "convert", help="convert a checkpoint to a single safetensors pipeline folder",
      description="Load a text model (+ VQGAN) in any supported layout; save one pipeline folder.")
  add = convert.add_argument
  add("text_model", metavar="TEXT_MODEL", help="text model (or pipeline) folder or repo id")
  add("--vqgan", help="VQGAN folder or repo id (default: the known pairing of TEXT_MODEL)")
  add("--revision", help="branch, tag or commit of TEXT_MODEL")
  add("--vqgan-revision", help="branch, tag or commit of --vqgan")
  add("--out", type=Path, required=True, help="folder to write")
  add("--max-shard-size", default="10GB", help="shard weights above this size (default: 10GB)")
  convert.set_defaults(func=_convert)

  serve = commands.add_parser(
      "serve", help="serve the web demo on this machine",
      description="Load the models once, print the URL and serve the demo page, its JSON and streaming "
                  "API (POST /api/generate, /api/generate/stream; POST /generate for dalle-mini's "
                  "front-ends; /docs) until Ctrl-C. Needs the [web] extra.")
  add = serve.add_argument
  add("--model", action="append", default=None,
      help=f"pipeline folder or Hub repo id; give it again to serve several (the page has a selector, "
           f"the first is the default; default: {default_help})")
  add("--vqgan", help="VQGAN repo id or folder (default: the model's own)")
  add("--revision", help="branch, tag or commit of --model")
  add("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
      help="computation dtype of the text model (default: float32)")
  add("--host", default="127.0.0.1",
      help="address to bind (default: 127.0.0.1, reachable from this machine only)")
  add("--port", type=_bounded_int("--port", 0, 65535), default=8000, help="port to bind; 0 picks a free one (default: 8000)")
  add("--max-queue", type=_bounded_int("--max-queue", 0, 1000), default=8,
      help="requests that may wait behind the running one; more get 429 (default: 8)")
  add("--progress-every", type=_bounded_int("--progress-every", 1, 1024), default=16,
      help="image tokens between streamed previews (default: 16)")
  serve.set_defaults(func=_serve, default_model=default)

  encode = commands.add_parser(
      "encode", help="encode captioned images with a VQGAN into parquet shards for fine-tuning",
      description="Encode (image, caption) pairs with the VQGAN into parquet shards (caption, "
                  "encoding), with a dataset card; run it again to resume an interrupted run.")
  add = encode.add_argument
  add("source", metavar="SOURCE",
      help="a folder of images with same-stem .txt captions, a folder with metadata.jsonl/.csv "
           "(file_name + caption), .tar shards (key.jpg + key.txt), or a datasets dataset")
  add("--vqgan", required=True, help="VQGAN folder or repo id, e.g. dalle-mini/vqgan_imagenet_f16_16384")
  add("--out", type=Path, required=True, help="output folder; the same folder resumes a run")
  add("--source-type", choices=("folder", "imagefolder", "webdataset", "datasets"),
      help="the kind of SOURCE (default: detected from its files)")
  add("--image-column", help="image column of a datasets dataset (default: image)")
  add("--caption-column", help="caption column of a metadata file or datasets dataset "
                               "(default: whichever of caption / text exists)")
  add("--split", default="train", help="split of a datasets dataset (default: train)")
  add("--batch-size", type=_positive_int, default=64,
      help="images per VQGAN call, split over the local devices (default: 64)")
  add("--shard-size", type=_positive_int, default=2048, help="inputs per parquet shard (default: 2048)")
  add("--min-size", type=_non_negative_int,
      help="skip images whose shorter side is smaller (default: half the VQGAN resolution)")
  add("--on-bad-image", choices=("skip", "error"), default="skip",
      help="skip and count unusable inputs, or stop at the first (default: skip)")
  add("--push-to-hub", metavar="REPO", help="upload the finished folder as this Hub dataset repo")
  add("--private", action="store_true", help="create the --push-to-hub repo as private")
  add("--no-progress", action="store_true", help="no progress bar")
  encode.set_defaults(func=_encode)

  train = commands.add_parser(
      "train", help="fine-tune a text model on encoded shards (resumes when run again)",
      description="Fine-tune (or train from scratch) on `dalle-flax encode` output; CONFIG is a JSON "
                  "or YAML file of the same settings, which flags override. Running again on the "
                  "same --output-dir resumes from its newest checkpoint.")
  train.add_argument("config", nargs="?", metavar="CONFIG", help="a .json / .yaml file of settings")
  _add_training_flags(train)
  train.set_defaults(func=_train)

  train_vqgan = commands.add_parser(
      "train-vqgan", help="train or fine-tune a VQGAN on images (resumes when run again)",
      description="Train a VQGAN (MODEL: a VQGAN folder / repo id to fine-tune, or a VQGAN config.json "
                  "for random weights) on a folder of images; CONFIG is a JSON or YAML file of the same "
                  "settings, which flags override. Running again on the same --output-dir resumes.")
  train_vqgan.add_argument("config", nargs="?", metavar="CONFIG", help="a .json / .yaml file of settings")
  _add_training_flags(train_vqgan, "vqgan")
  train_vqgan.set_defaults(func=_train_vqgan)
  return parser


def _add_training_flags(parser: argparse.ArgumentParser, kind: str = "text") -> None:
  """One flag per TrainingArguments (or VQGANTrainingArguments) field (``--max-steps`` and
  ``--max_steps``); unset flags keep the CONFIG file's value, then the field's default."""
  import dataclasses

  parsers = {"int": _int, "float": _finite_float, "str": str}
  try:
    arguments_class = _arguments_class(kind)
  except ModuleNotFoundError as error:  # no [train] extra: `generate` still works, this command says why not
    parser.set_defaults(missing_module=error.name)
    return
  for field in dataclasses.fields(arguments_class):
    names = [f"--{field.name.replace('_', '-')}"] + ([f"--{field.name}"] if "_" in field.name else [])
    kind = str(field.type).replace(" | None", "")
    default = field.default if field.default is not dataclasses.MISSING else None
    shown = f" (default: {default})" if default not in (None, "", ()) else ""
    if kind == "bool":
      parser.add_argument(*names, dest=field.name, action="store_true", default=argparse.SUPPRESS,
                          help=f"{field.name.replace('_', ' ')}{shown}")
    elif kind.startswith("tuple"):
      parser.add_argument(*names, dest=field.name, nargs="*", default=argparse.SUPPRESS, metavar="TEXT")
    else:
      parser.add_argument(*names, dest=field.name, type=parsers[kind], default=argparse.SUPPRESS,
                          metavar=field.name.split("_")[-1].upper(), help=shown.strip(" ()") or None)


def _slug(prompt: str, limit: int = 48) -> str:
  slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-")
  return slug or "image"


def _unique(path: Path, taken: set[Path]) -> Path:
  candidate, k = path, 1
  while candidate in taken:
    candidate = path.with_name(f"{path.stem}_{k}{path.suffix}")
    k += 1
  taken.add(candidate)
  return candidate


def _load_pipeline(args: argparse.Namespace) -> TextToImagePipeline:
  from .pipelines import pipeline

  if args.model is None:
    raise ValueError("no default model is bundled with this installation; pass --model "
                     "dalle-mini/dalle-mini (or a pipeline folder).")
  return pipeline("text-to-image", model=args.model, vqgan=args.vqgan, revision=args.revision,
                  dtype=args.dtype)


def _generate(args: argparse.Namespace) -> int:
  pipe = _load_pipeline(args)
  pipe.set_progress_bar_config(disable=args.no_progress, leave=False)
  tiled = args.grid or args.seamless
  out = pipe(
      args.prompts, num_images_per_prompt=args.num_images, seed=args.seed,
      guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
      top_p=args.top_p, negative_prompt=args.negative_prompt, grid=tiled, seamless=args.seamless,
      batch_size=args.batch_size, return_dict=True)
  args.out.mkdir(parents=True, exist_ok=True)
  taken: set[Path] = set()
  for prompt, images, seeds in zip(args.prompts, out.images, out.seeds):
    slug = _slug(prompt)
    names = [f"{slug}_grid_{seeds[0]}.png"] if tiled else [f"{slug}_{seed}.png" for seed in seeds]
    for image, name in zip(images, names):
      path = _unique(args.out / name, taken)
      image.save(path)
      print(path)
  return 0


def _convert(args: argparse.Namespace) -> int:
  from .pipelines import TextToImagePipeline

  pipe = TextToImagePipeline.from_pretrained(
      args.text_model, vqgan=args.vqgan, revision=args.revision, vqgan_revision=args.vqgan_revision)
  pipe.save_pretrained(args.out, max_shard_size=args.max_shard_size)
  print(args.out)
  return 0


def _serve(args: argparse.Namespace) -> int:
  from . import web  # fails here, before a model loads, when the [web] extra is missing

  names = list(dict.fromkeys(args.model or ([args.default_model] if args.default_model else [None])))
  pipes = {}
  for name in names:
    pipe = _load_pipeline(argparse.Namespace(**{**vars(args), "model": name}))
    pipe.set_progress_bar_config(disable=True)
    pipes[name] = pipe
  logging.getLogger("dalle_flax.web").setLevel(logging.INFO)  # one log line per generation
  web.serve(pipes, args.host, args.port, max_queue=args.max_queue, progress_every=args.progress_every,
            on_ready=lambda url: print(url, flush=True))
  return 0


def _encode(args: argparse.Namespace) -> int:
  from .training.encode import encode_dataset

  summary = encode_dataset(
      args.source, vqgan=args.vqgan, out=args.out, source_type=args.source_type,
      image_column=args.image_column, caption_column=args.caption_column, split=args.split,
      batch_size=args.batch_size, shard_size=args.shard_size, min_size=args.min_size,
      on_bad_image=args.on_bad_image, push_to_hub=args.push_to_hub,
      private=True if args.private else None, progress=not args.no_progress)
  skipped = ", ".join(f"{reason} {count:,}" for reason, count in summary.skipped.items())
  now = (f"{summary.shards_encoded} encoded now at {summary.images_per_second:.1f} images/s"
         if summary.shards_encoded else "none left to encode")
  print(f"wrote {summary.written:,} rows of {summary.num_inputs:,} inputs to {summary.out} "
        f"({summary.shards_done} of {summary.num_shards} shards; {now})")
  print(f"skipped: {skipped or 'none'}")
  if summary.pushed:
    print(summary.pushed)
  return 0


def _arguments_class(kind: str) -> type:
  if kind == "vqgan":
    from .training.vqgan_trainer import VQGANTrainingArguments
    return VQGANTrainingArguments
  from .training.arguments import TrainingArguments
  return TrainingArguments


def _missing_train_extra(args: argparse.Namespace) -> int:
  print(f"dalle-flax: error: {args.command} needs the [train] extra (missing {args.missing_module}): "
        "pip install 'dalle-flax[train]'", file=sys.stderr)
  return 1


def _train_vqgan(args: argparse.Namespace) -> int:
  if getattr(args, "missing_module", None):
    return _missing_train_extra(args)
  from .training.arguments import load_arguments_file
  from .training.vqgan_trainer import VQGANTrainingArguments, train_vqgan

  settings = load_arguments_file(args.config, VQGANTrainingArguments) if args.config else {}
  skip = {"command", "func", "config", "traceback"}
  settings.update({k: v for k, v in vars(args).items() if k not in skip})
  result = train_vqgan(VQGANTrainingArguments(**settings))
  shown = {k: round(v, 4) for k, v in {**result.last_metrics, **(result.eval or {})}.items()
           if k in ("loss", "mse", "eval_psnr", "eval_codes_used")}
  print(f"trained {result.steps} steps{' (resumed at ' + str(result.resumed_from) + ')' if result.resumed_from else ''}"
        f"; last {shown}; VQGAN in {result.output_dir}")
  if result.pushed:
    print(result.pushed)
  return 0


def _train(args: argparse.Namespace) -> int:
  if getattr(args, "missing_module", None):
    return _missing_train_extra(args)
  try:
    from .training import train
  except ModuleNotFoundError as error:
    args.missing_module = error.name
    return _missing_train_extra(args)
  from .training import TrainingArguments
  from .training.arguments import load_arguments_file

  settings = load_arguments_file(args.config) if args.config else {}
  skip = {"command", "func", "config", "traceback"}
  settings.update({k: v for k, v in vars(args).items() if k not in skip})
  result = train(TrainingArguments(**settings))
  losses = {k: round(v, 4) for k, v in result.last_metrics.items() if k in ("loss", "accuracy")}
  print(f"trained {result.steps} steps{' (resumed at ' + str(result.resumed_from) + ')' if result.resumed_from else ''}"
        f"; last {losses}; pipeline in {result.output_dir}")
  if result.pushed:
    print(result.pushed)
  return 0


def _one_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  message = lines[0] if lines else type(error).__name__
  if len(lines) > 1:
    message += " (rerun with --traceback for the details)"
  return message


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command line; returns the exit status (0 success, 1 error, 2 bad usage)."""
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  if unknown and not getattr(args, "missing_module", None):  # a command without [train] takes any flags
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    return args.func(args)
  except (OSError, ValueError, TypeError, KeyError, ImportError) as error:
    if args.traceback:
      raise
    print(f"dalle-flax: error: {_one_line(error)}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("dalle-flax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
