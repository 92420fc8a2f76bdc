"""The recipe of the bundled default model: shapes data -> VQGAN -> encode -> DalleBart -> bundle.

Usage::

    python scripts/train_shapes_model.py --work runs/shapes            # the whole recipe (~40 min, 2 CPU cores)
    python scripts/train_shapes_model.py --work runs/shapes --publish  # ... then copy it into the package
    python scripts/train_shapes_model.py --work /tmp/quick --quick     # a 2-minute shrunken run (the test's)

Config as code (big_vision style): :data:`CONFIG` holds every setting and seed; ``--quick``
shrinks it (``runlocal``). Every step runs the public commands (``python -m dalle_flax.datasets.shapes``,
``dalle-flax train-vqgan``, ``dalle-flax encode``, ``dalle-flax train``) as a new user would, and
is skipped when its output is complete, so an interrupted recipe resumes where it stopped (the
training steps themselves resume from their checkpoints). Steps:

1. data: procedural shapes (:mod:`dalle_flax.datasets.shapes`): train scenes never hold a
   held-out (colour, shape, position) triple; the eval scenes hold only those.
2. VQGAN: 64x64 images -> 8x8 codes from a 512-entry codebook, trained from random weights.
3. the initial pipeline: a byte-level BPE tokenizer trained on the (normalized) train captions,
   a small DalleBart config, the VQGAN, the processor.
4. encode the train and eval images with the trained VQGAN (parquet shards).
5. DalleBart from random weights on the codes (eval loss on held-out combinations).
6. bundle: the exported pipeline with the generation defaults, its training curves, an example
   grid and its model card; ``--publish`` copies it to ``src/dalle_flax/bundled/shapes``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "src" / "dalle_flax" / "bundled" / "shapes"

CONFIG = {
    "seed": 0,
    "data": {"train": 20000, "eval": 512, "size": 64, "two_shape_prob": 0.0, "train_seed": 0, "eval_seed": 1},
    # norm_num_groups 8: 4-8 channels per GroupNorm group. With taming's 32 groups and ch 32 a
    # GroupNorm is an instance norm (one channel per group), which removes the colour of flat
    # areas: the shapes came back as blobs of one average colour after 1500 steps.
    "vqgan_config": dict(resolution=64, ch=32, ch_mult=[2, 2, 2, 2], num_res_blocks=1, attn_resolutions=[],
                         z_channels=64, n_embed=512, embed_dim=32, norm_num_groups=8),
    # l2: the shapes are ~5% of the pixels and their colour errors are large; a squared loss
    # weighs them more than l1 does.
    "vqgan": dict(train_batch_size=16, max_steps=800, learning_rate=1e-3, warmup_steps=50, schedule="cosine",
                  decay_steps=750, end_learning_rate=1e-4, reconstruction="l2", restart_steps=50,
                  quantize_from_step=150, logging_steps=25, eval_steps=100, save_steps=200),
    "tokenizer": {"vocab_size": 400, "min_frequency": 2},
    "text_config": dict(d_model=128, encoder_layers=3, decoder_layers=4, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_text_length=32,
                        dropout=0.0, normalize_text=True, use_scan=True, gradient_checkpointing=False),
    "text": dict(train_batch_size=64, max_steps=1500, learning_rate=1e-3, warmup_steps=100, schedule="cosine",
                 decay_steps=1400, end_learning_rate=5e-5, weight_decay=0.01, blank_caption_prob=0.1,
                 logging_steps=25, eval_steps=500, save_steps=500),
    # chosen by a sweep on the 200 held-out prompts (guidance 1-3, temperature 0.3-1, top-k 0-32):
    # guidance 3 / temperature 1 / top-k 32 scored colour 0.44, shape 0.24; this setting 0.77, 0.285
    "generation": {"guidance_scale": 1.5, "top_k": 8, "temperature": 0.5},
    "eval_prompts": ["a red circle on a blue background", "a big yellow star in the centre, on a black background",
                     "a small green triangle on the left, on a white background",
                     "a purple heart at the top on an orange background"],
}


def quick(config: dict) -> dict:
  """The shrunken run: every step, minutes instead of most of an hour (results are not meaningful)."""
  config = copy.deepcopy(config)
  config["data"].update(train=256, eval=64)
  config["vqgan_config"].update(n_embed=64)
  config["vqgan"].update(max_steps=20, warmup_steps=2, decay_steps=18, logging_steps=5, eval_steps=20,
                         save_steps=10, restart_steps=5, quantize_from_step=5)
  config["text_config"].update(d_model=64, encoder_layers=1, decoder_layers=1)
  config["text"].update(train_batch_size=16, max_steps=20, warmup_steps=2, decay_steps=18, logging_steps=5,
                        eval_steps=20, save_steps=10)
  return config


def run(*args: str) -> None:
  """One public command in a new process (as a user would run it); its failure stops the recipe."""
  print("+", " ".join(args), flush=True)
  subprocess.run([sys.executable, "-m", *args], check=True, cwd=REPO)


def step_data(work: Path, config: dict) -> None:
  data = config["data"]
  for split, seed in (("train", data["train_seed"]), ("eval", data["eval_seed"])):
    out = work / "data" / split
    if (out / "metadata.jsonl").is_file():
      continue
    run("dalle_flax.datasets.shapes", "--out", str(out), "--num", str(data[split]), "--seed", str(seed),
        "--split", split, "--size", str(data["size"]), "--two-shape-prob", str(data["two_shape_prob"]))


def step_vqgan(work: Path, config: dict) -> None:
  out = work / "vqgan"
  if (out / "model.safetensors").is_file() and (out / "README.md").is_file():
    return
  work.mkdir(parents=True, exist_ok=True)
  (work / "vqgan_config.json").write_text(json.dumps(config["vqgan_config"], indent=2))
  settings = dict(config["vqgan"], model=str(work / "vqgan_config.json"), train_data=str(work / "data" / "train"),
                  eval_data=str(work / "data" / "eval"), output_dir=str(out), seed=config["seed"])
  (work / "vqgan.json").write_text(json.dumps(settings, indent=2))
  run("dalle_flax.cli", "train-vqgan", str(work / "vqgan.json"))


def step_init(work: Path, config: dict) -> None:
  """The pipeline the text training starts from: tokenizer, config, VQGAN, processor."""
  out = work / "init"
  if (out / "config.json").is_file():
    return
  from tokenizers import ByteLevelBPETokenizer

  from dalle_flax import (DalleBartConfig, DalleBartTokenizer, DalleMiniProcessor,
                          FlaxDalleMiniForConditionalGeneration, FlaxVQGANModel)
  from dalle_flax.pipelines.loading import DalleMiniPipelineModel
  from dalle_flax.text_normalization import TextNormalizer

  rows = [json.loads(line) for line in (work / "data" / "train" / "metadata.jsonl").read_text().splitlines()]
  normalizer = TextNormalizer()
  captions = [normalizer(row["text"]) for row in rows]
  specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
  bpe = ByteLevelBPETokenizer(add_prefix_space=False)
  bpe.train_from_iterator(captions, vocab_size=config["tokenizer"]["vocab_size"],
                          min_frequency=config["tokenizer"]["min_frequency"], special_tokens=specials)
  tokenizer_dir = work / "tokenizer"
  tokenizer_dir.mkdir(parents=True, exist_ok=True)
  bpe.save_model(str(tokenizer_dir))
  tokenizer = DalleBartTokenizer(vocab_file=str(tokenizer_dir / "vocab.json"),
                                 merges_file=str(tokenizer_dir / "merges.txt"))
  vqgan = FlaxVQGANModel.from_pretrained(work / "vqgan")
  text_config = DalleBartConfig(encoder_vocab_size=len(tokenizer), image_vocab_size=vqgan.config.n_embed,
                                image_length=(vqgan.config.resolution // vqgan.config.downsample_factor) ** 2,
                                **config["text_config"])
  text_model = FlaxDalleMiniForConditionalGeneration(text_config, seed=config["seed"])
  processor = DalleMiniProcessor(tokenizer, normalize_text=text_config.normalize_text,
                                 max_text_length=text_config.max_text_length)
  longest = max(len(tokenizer(c)["input_ids"]) for c in captions)
  if longest > text_config.max_text_length:
    raise ValueError(f"a train caption has {longest} tokens, over max_text_length {text_config.max_text_length}.")
  DalleMiniPipelineModel(text_model, vqgan, processor, name_or_path="shapes").save_pretrained(out)


def step_encode(work: Path, config: dict) -> None:
  for split in ("train", "eval"):
    out = work / "encoded" / split
    info = out / "encoding_info.json"
    if info.is_file() and json.loads(info.read_text()).get("complete"):
      continue
    run("dalle_flax.cli", "encode", str(work / "data" / split), "--vqgan", str(work / "vqgan"), "--out", str(out),
        "--no-progress")


def step_text(work: Path, config: dict) -> None:
  out = work / "text"
  if (out / "config.json").is_file() and (out / "README.md").is_file() and _done(out, config["text"]["max_steps"]):
    return
  settings = dict(config["text"], model=str(work / "init"), from_scratch=True, train_data=str(work / "encoded" / "train"),
                  eval_data=str(work / "encoded" / "eval"), output_dir=str(out), seed=config["seed"],
                  eval_prompts=config["eval_prompts"])
  (work / "text.json").write_text(json.dumps(settings, indent=2))
  run("dalle_flax.cli", "train", str(work / "text.json"))


def _done(out: Path, steps: int) -> bool:
  metrics = out / "metrics.jsonl"
  return metrics.is_file() and any(json.loads(line).get("step") == steps for line in metrics.read_text().splitlines())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--work", type=Path, default=REPO / "runs" / "shapes", help="where every step writes")
  parser.add_argument("--quick", action="store_true", help="the shrunken run (minutes; not a usable model)")
  parser.add_argument("--publish", action="store_true", help=f"copy the bundle into {BUNDLE.relative_to(REPO)}")
  args = parser.parse_args(argv)
  config = quick(CONFIG) if args.quick else CONFIG
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  # a rerun skips finished steps in seconds: keep the time of the run that did the work
  previous = args.work / "timings.json"
  earlier = json.loads(previous.read_text()) if previous.is_file() else {}
  timings = {}
  for name, step in (("data", step_data), ("vqgan", step_vqgan), ("init", step_init), ("encode", step_encode),
                     ("text", step_text)):
    start = time.perf_counter()
    step(args.work, config)
    timings[name] = max(round(time.perf_counter() - start, 1), earlier.get(name, 0.0))
    print(f"step {name}: {timings[name]} s", flush=True)
  from bundle_shapes_model import make_bundle  # scripts/bundle_shapes_model.py

  start = time.perf_counter()
  bundle = make_bundle(args.work, config)
  timings["bundle"] = round(time.perf_counter() - start, 1)
  (args.work / "timings.json").write_text(json.dumps(timings, indent=2))
  print(json.dumps({"timings_s": timings, "bundle": str(bundle)}))
  if args.publish:
    if BUNDLE.exists():
      shutil.rmtree(BUNDLE)
    shutil.copytree(bundle, BUNDLE)
    card = REPO / "model_cards" / "dalle-flax-shapes.md"
    card.parent.mkdir(exist_ok=True)
    shutil.copy2(bundle / "README.md", card)
    print(f"published to {BUNDLE} (model card also in {card.relative_to(REPO)})")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  raise SystemExit(main())
