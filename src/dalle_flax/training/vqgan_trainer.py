"""Training a VQGAN on a folder of images: the loop, with the text trainer's checkpoints, resume and export.

Example::

    train_vqgan(VQGANTrainingArguments(model="vqgan_config.json", train_data="images/", output_dir="vqgan/"))
    vqgan = FlaxVQGANModel.from_pretrained("vqgan/")

``model`` is a VQGAN to fine-tune (folder or repo id, any format we load) or a ``config.json``
of one, trained from random weights (``from_scratch=True`` does that for a full model too).
``train_data`` / ``eval_data`` are image sources as ``dalle-flax encode`` reads them (a folder
with ``.txt`` captions or without, an imagefolder with ``metadata.jsonl``, ``.tar`` shards, a
``datasets`` dataset); images are resized and centre-cropped to ``resolution`` once and held in
memory as uint8, which suits the small sets this trains on (20,000 64x64 images: 250 MB).

What a run writes in ``output_dir`` (as :func:`dalle_flax.training.train`):

    checkpoints/<step>/     orbax checkpoints: train state (incl. code usage) + data iterator
    metrics.jsonl           one JSON line per logged step (step, loss, reconstruction_loss,
                            codebook_loss, commitment_loss, mse, grad_norm, codes_used,
                            perplexity, restarted, learning_rate, samples_per_second) and per
                            eval (eval_loss, eval_mse, eval_psnr, eval_codes_used, ...)
    training_args.json      the settings (a resume with other data or optimizer settings is refused)
    samples/step_<N>.png    eval images (top row) over their reconstructions (bottom row)
    config.json, model.safetensors, README.md
                            the exported FlaxVQGANModel: FlaxVQGANModel.from_pretrained(output_dir)

Running again on the same ``output_dir`` resumes from the newest checkpoint with the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from tqdm.auto import tqdm

from ..configuration_vqgan import VQGANConfig
from ..hub_utils import atomic_write
from ..image_utils import from_pil, make_image_grid, to_pil
from ..modeling_flax_vqgan import FlaxVQGANModel
from ..sharding import make_mesh
from .arguments import parse_mesh
from .checkpoint import Checkpoints
from .optim import OptimizerSettings, build_optimizer, learning_rate_schedule
from .sources import open_source
from .trainer import METRICS_FILE, _check_or_write_args, _init_distributed, _MetricsLog, _to_host
from .vqgan_step import (VQGANLossSettings, abstract_vqgan_state, init_vqgan_state, make_vqgan_eval_step,
                         make_vqgan_train_step, shard_images)

logger = logging.getLogger(__name__)

__all__ = ["VQGANTrainResult", "VQGANTrainingArguments", "load_images", "train_vqgan"]

_OPT = OptimizerSettings()
_LOSS = VQGANLossSettings()
_RESUME_KEYS = ("model", "train_data", "from_scratch", "resolution", "train_batch_size", "seed", "optimizer",
                "reconstruction", "mesh")


@dataclasses.dataclass
class VQGANTrainingArguments:
  """Settings of :func:`train_vqgan`.

  Attributes:
    model: a VQGAN (folder or repo id) to fine-tune, or a VQGAN ``config.json`` to train from
      random weights.
    train_data: the training images (any ``dalle-flax encode`` source; captions are ignored).
    output_dir: checkpoints, ``metrics.jsonl``, samples and the exported VQGAN; a rerun resumes.
    eval_data: held-out images for the eval metrics and sample reconstructions.
    from_scratch: random weights with ``model``'s config.
    resolution: image side (default: the config's ``resolution``); a multiple of the
      downsampling factor.
    train_batch_size, max_steps, seed: as for the text model (seed: data order, restarts, init).
    optimizer ... max_grad_norm: see :class:`~dalle_flax.training.optim.OptimizerSettings`.
    reconstruction ... quantize_from_step: see :class:`~dalle_flax.training.vqgan_step.VQGANLossSettings`.
    mesh: "dp=N" (the VQGAN is replicated; default: every device on dp).
    logging_steps, eval_steps, save_steps, save_total_limit: intervals in steps (eval 0: off).
    num_samples: eval images shown (with their reconstructions) in each sample grid.
    push_to_hub, hub_token, hub_private: push the exported VQGAN at the end.
    coordinator_address, num_processes, process_id: ``jax.distributed.initialize`` arguments.
  """

  model: str = ""
  train_data: str = ""
  output_dir: str = ""
  eval_data: str | None = None
  from_scratch: bool = False
  resolution: int | None = None
  train_batch_size: int = 32
  max_steps: int = 2000
  seed: int = 0
  optimizer: str = _OPT.optimizer
  learning_rate: float = 2e-4
  warmup_steps: int = _OPT.warmup_steps
  schedule: str = _OPT.schedule
  decay_steps: int | None = _OPT.decay_steps
  end_learning_rate: float = _OPT.end_learning_rate
  weight_decay: float = _OPT.weight_decay
  max_grad_norm: float | None = _OPT.max_grad_norm
  reconstruction: str = _LOSS.reconstruction
  codebook_weight: float = _LOSS.codebook_weight
  commitment_weight: float = _LOSS.commitment_weight
  restart_steps: int = _LOSS.restart_steps
  restart_threshold: float = _LOSS.restart_threshold
  usage_decay: float = _LOSS.usage_decay
  quantize_from_step: int = _LOSS.quantize_from_step
  mesh: str | None = None
  logging_steps: int = 10
  eval_steps: int = 0
  save_steps: int = 500
  save_total_limit: int = 3
  num_samples: int = 8
  push_to_hub: str | None = None
  hub_token: str | None = None
  hub_private: bool | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self) -> None:
    for name in ("model", "train_data", "output_dir"):
      if not getattr(self, name):
        raise ValueError(f"VQGANTrainingArguments.{name} is required (CLI: --{name.replace('_', '-')}).")
    for name in ("train_batch_size", "max_steps", "logging_steps", "save_steps", "save_total_limit", "num_samples"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if self.eval_steps < 0:
      raise ValueError(f"eval_steps must be >= 0 (0 disables eval), got {self.eval_steps!r}.")
    if self.resolution is not None and self.resolution < 1:
      raise ValueError(f"resolution must be >= 1, got {self.resolution}.")
    self.optimizer_settings()  # validates those fields now, not after the images are read
    self.loss_settings()

  def optimizer_settings(self) -> OptimizerSettings:
    fields = {f.name for f in dataclasses.fields(OptimizerSettings)}
    return OptimizerSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})

  def loss_settings(self) -> VQGANLossSettings:
    fields = {f.name for f in dataclasses.fields(VQGANLossSettings)}
    return VQGANLossSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})

  def to_dict(self) -> dict[str, Any]:
    values = dataclasses.asdict(self)
    values["hub_token"] = None
    return values


@dataclasses.dataclass
class VQGANTrainResult:
  """What :func:`train_vqgan` did: the folder, steps, resumed step, last train / eval metrics, push URL."""

  output_dir: Path
  steps: int
  resumed_from: int | None
  last_metrics: dict[str, float]
  eval: dict[str, float] | None = None
  pushed: str | None = None


def train_vqgan(args: VQGANTrainingArguments) -> VQGANTrainResult:
  """Runs (or resumes) the VQGAN training described by ``args``; see the module docstring."""
  _init_distributed(args)
  output_dir = Path(args.output_dir)
  if parse_mesh(args.mesh, None)[1] != 1:
    raise ValueError(f"VQGAN training is data-parallel only (the model is replicated); got mesh {args.mesh!r}, "
                     "use dp=N.")
  dp, _ = parse_mesh(args.mesh, jax.device_count())
  processes = jax.process_count()
  if args.train_batch_size % dp or args.train_batch_size % processes:
    raise ValueError(f"train_batch_size {args.train_batch_size} must be divisible by dp={dp} and by the "
                     f"{processes} process(es); use a multiple of {math.lcm(dp, processes)}.")

  # 1. The model (weights, or a config for random ones) and the images, checked before compiling.
  model, params = _load_model(args)
  resolution = args.resolution or model.config.resolution
  factor = model.config.downsample_factor
  if resolution % factor:
    raise ValueError(f"resolution {resolution} is not a multiple of the VQGAN's downsampling factor {factor}; "
                     f"use e.g. {max(factor, resolution // factor * factor)}.")
  groups = model.config.norm_num_groups
  narrowest = min([model.config.ch] + [model.config.ch * m for m in model.config.ch_mult])
  if narrowest < 4 * groups:
    logger.warning("the narrowest GroupNorm has %d channels in %d groups (%d per group): with so few a "
                   "GroupNorm acts like an instance norm and removes the colour of flat areas, which is slow "
                   "to learn; use norm_num_groups <= %d in the VQGAN config (or a wider ch).",
                   narrowest, groups, narrowest // groups, max(1, narrowest // 4))
  images = load_images(args.train_data, resolution)
  eval_images = load_images(args.eval_data, resolution) if args.eval_data else None
  if len(images) < args.train_batch_size:
    raise ValueError(f"train_data has {len(images)} usable images, fewer than one batch "
                     f"({args.train_batch_size}); add images or lower train_batch_size.")
  if jax.process_index() == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_args(output_dir, args, keys=_RESUME_KEYS)
  mesh = make_mesh(dp=dp, mp=1)
  per_process = args.train_batch_size // processes
  iterator = iter(image_batches(images, per_process, seed=args.seed,
                                process_slice=(jax.process_index(), processes)))

  # 2. State: fresh, or the newest checkpoint (which also repositions the data iterator).
  settings, losses = args.optimizer_settings(), args.loss_settings()
  optimizer = build_optimizer(settings)
  schedule = learning_rate_schedule(settings)
  checkpoints = Checkpoints(output_dir / "checkpoints", save_every=args.save_steps, keep=args.save_total_limit)
  resumed_from = checkpoints.latest_step
  if resumed_from is not None:
    state = checkpoints.restore(resumed_from, abstract_vqgan_state(model, optimizer, mesh), iterator)
    logger.info("Resuming %s from step %d", output_dir, resumed_from)
  else:
    state = init_vqgan_state(model, params, optimizer, mesh, seed=args.seed)
  model.params = None  # the state holds the only copy from here on
  start = int(_to_host(state.step))
  metrics_log = _MetricsLog(output_dir / METRICS_FILE, keep_until=start)
  train_step = make_vqgan_train_step(model, optimizer, mesh, losses)
  eval_step = make_vqgan_eval_step(model, mesh, losses) if eval_images is not None else None

  # 3. The loop.
  last: dict[str, float] = {}
  last_eval = None
  window_start, window_steps = time.perf_counter(), 0
  bar = tqdm(total=args.max_steps, initial=start, desc="Training VQGAN", unit="step",
             disable=jax.process_index() != 0)
  try:
    for step in range(start + 1, args.max_steps + 1):
      state, metrics = train_step(state, shard_images(_to_float(next(iterator)), mesh))
      window_steps += 1
      if step % args.logging_steps == 0 or step == args.max_steps:
        elapsed = time.perf_counter() - window_start
        last = {k: float(v) for k, v in _to_host(metrics).items()}
        last["learning_rate"] = float(schedule(step - 1))
        last["samples_per_second"] = window_steps * args.train_batch_size / max(elapsed, 1e-9)
        metrics_log.write({"step": step, **last})
        bar.set_postfix(loss=f"{last['loss']:.4f}", codes=int(last["codes_used"]))
        window_start, window_steps = time.perf_counter(), 0
      if eval_step is not None and args.eval_steps and step % args.eval_steps == 0:
        last_eval = _evaluate(eval_step, state.params, eval_images, args, mesh, model.config.n_embed)
        metrics_log.write({"step": step, **last_eval})
        _write_samples(model, state.params, eval_images[: args.num_samples], output_dir, step)
      checkpoints.save(step, state, iterator, force=step == args.max_steps)
      bar.update(1)
  finally:
    bar.close()
    checkpoints.close()

  # 4. Export a FlaxVQGANModel folder with a card recording the run (and push it).
  model.params = jax.tree.map(np.asarray, _to_host(state.params))
  pushed = None
  if jax.process_index() == 0:
    model.save_pretrained(output_dir)
    with atomic_write(output_dir / "README.md", "w") as f:
      f.write(_model_card(model, args, len(images), last, last_eval))
    if args.push_to_hub:
      pushed = model.push_to_hub(args.push_to_hub, token=args.hub_token, private=args.hub_private,
                                 commit_message=f"VQGAN trained for {args.max_steps} steps with dalle-flax")
  return VQGANTrainResult(output_dir, args.max_steps, resumed_from, last, last_eval, pushed)


# --- data ------------------------------------------------------------------------------------------
def load_images(source: str, resolution: int, *, num_threads: int = 4) -> np.ndarray:
  """Every readable image of ``source`` as (n, resolution, resolution, 3) uint8, in the source's order.

  Unreadable images are skipped with a warning naming how many; none at all is an error.
  """
  examples = open_source(source, require_captions=False).examples

  def read(example: Any) -> np.ndarray | None:
    try:
      with example.open_image() as image:
        image.load()
        pixels = from_pil(image.convert("RGB"), size=resolution)[0]
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError... on bad files
      logger.warning("skipping %s: %s: %s", example.key, type(e).__name__, e)
      return None
    return np.round(pixels * 255.0).astype(np.uint8)

  with ThreadPoolExecutor(num_threads) as pool:
    decoded = list(pool.map(read, examples))
  kept = [x for x in decoded if x is not None]
  if not kept:
    raise ValueError(f"none of the {len(examples)} images of {source!r} could be read.")
  if len(kept) < len(decoded):
    logger.warning("%d of %d images of %s were unreadable and skipped", len(decoded) - len(kept), len(decoded),
                   source)
  return np.stack(kept)


def image_batches(images: np.ndarray, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                  num_epochs: int | None = None, process_slice: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """uint8 image batches as a checkpointable grain dataset.

  Global batches of ``batch_size * count`` images are drawn in one seeded order (a new
  permutation each epoch) and each process keeps its ``batch_size`` (``process_slice`` =
  ``(index, count)``), so any number of processes sees the batches of one.
  """
  index, count = process_slice
  if batch_size * count > len(images):
    raise ValueError(f"a batch of {batch_size * count} images needs at least that many, got {len(images)}.")
  ds = grain.MapDataset.source(images)
  if shuffle:
    ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
  part = slice(index * batch_size, (index + 1) * batch_size)
  ds = ds.batch(batch_size * count, drop_remainder=True, batch_fn=lambda rows: np.stack(rows[part]))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def _to_float(batch: np.ndarray) -> np.ndarray:
  return np.asarray(batch, np.float32) / 255.0


# --- helpers ---------------------------------------------------------------------------------------
def _load_model(args: VQGANTrainingArguments) -> tuple[FlaxVQGANModel, Any]:
  """(model without params, its params or None for a random init)."""
  path = Path(args.model)
  if path.suffix == ".json" and path.is_file():
    config = VQGANConfig.from_json_file(str(path))
    return FlaxVQGANModel(config, _do_init=False), None
  if args.from_scratch:
    config = VQGANConfig.from_pretrained(args.model)
    return FlaxVQGANModel(config, _do_init=False), None
  model = FlaxVQGANModel.from_pretrained(args.model)
  params = model.params
  model.params = None
  return model, params


def _evaluate(eval_step: Any, params: Any, images: np.ndarray, args: VQGANTrainingArguments, mesh: Any,
              n_embed: int) -> dict[str, float]:
  """Means over whole batches of the eval images, PSNR from the mean MSE, codes used over all of them."""
  per_process = args.train_batch_size // jax.process_count()
  if len(images) < args.train_batch_size:
    raise ValueError(f"eval_data has {len(images)} images, fewer than one batch ({args.train_batch_size}); "
                     "add images or lower train_batch_size.")
  batches = image_batches(images, per_process, shuffle=False, num_epochs=1,
                          process_slice=(jax.process_index(), jax.process_count()))
  results = [_to_host(eval_step(params, shard_images(_to_float(batch), mesh))) for batch in batches]
  out = {f"eval_{k}": float(np.mean([r[k] for r in results]))
         for k in ("loss", "reconstruction_loss", "codebook_loss", "commitment_loss", "mse")}
  out["eval_psnr"] = float(-10.0 * np.log10(max(out["eval_mse"], 1e-12)))
  codes = np.concatenate([np.asarray(r["codes"]).reshape(-1) for r in results])
  out["eval_codes_used"] = float(len(np.unique(codes)))
  share = np.bincount(codes, minlength=n_embed) / codes.size
  out["eval_perplexity"] = float(np.exp(-np.sum(share[share > 0] * np.log(share[share > 0]))))
  return out


def _write_samples(model: FlaxVQGANModel, params: Any, images: np.ndarray, output_dir: Path, step: int) -> None:
  """Originals (top row) over reconstructions (bottom row), by process 0."""
  if jax.process_index() != 0:
    return
  pixels = _to_float(images)
  host = jax.tree.map(np.asarray, _to_host(params))
  reconstructed, _ = model(pixels, params=host)
  grid = to_pil(np.concatenate([pixels, np.clip(np.asarray(reconstructed), 0.0, 1.0)]))
  path = output_dir / "samples" / f"step_{step:07d}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic_write(path) as f:
    make_image_grid(grid, rows=2, cols=len(images)).save(f, format="PNG")


def _model_card(model: FlaxVQGANModel, args: VQGANTrainingArguments, num_images: int, last: dict[str, float],
                last_eval: dict[str, float] | None) -> str:
  name = Path(args.output_dir).name
  card = model.model_card(args.push_to_hub or name)
  rows = [("base", "random init (" + args.model + " config)" if args.from_scratch or args.model.endswith(".json")
           else args.model), ("train data", f"{args.train_data} ({num_images} images)"),
          ("steps x batch", f"{args.max_steps} x {args.train_batch_size}"),
          ("optimizer", f"{args.optimizer}, lr {args.learning_rate}, {args.schedule}, warmup {args.warmup_steps}"),
          ("loss", f"{args.reconstruction} + {args.codebook_weight} codebook + {args.commitment_weight} commitment; "
                   f"dead-code restarts every {args.restart_steps} steps"),
          ("final train loss", _fmt(last.get("loss"))), ("final train MSE", _fmt(last.get("mse")))]
  if last_eval:
    rows += [("eval PSNR (dB)", _fmt(last_eval.get("eval_psnr"))),
             ("eval codes used", _fmt(last_eval.get("eval_codes_used"))),
             ("eval perplexity", _fmt(last_eval.get("eval_perplexity")))]
  table = "\n".join(f"| {k} | {v} |" for k, v in rows)
  return card.rstrip() + "\n\n## Training\n\nTrained with `dalle_flax.training.train_vqgan`:\n\n| | |\n|---|---|\n" + \
      table + "\n"


def _fmt(value: float | None) -> str:
  return "-" if value is None else f"{value:.4g}"
