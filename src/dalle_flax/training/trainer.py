"""The fine-tuning loop: load, train, log, checkpoint, resume, evaluate, export, push.

Example: ``result = train(TrainingArguments(model="path/to/pipeline", train_data="encoded/", output_dir="run/"))``.

The only place with I/O and progress (big_vision ``train.py``, maxtext ``train.py``): the step
itself is :func:`~dalle_flax.training.step.make_train_step`'s pure jitted function. What a run
writes in ``output_dir``:

    checkpoints/<step>/     orbax checkpoints: train state + data iterator (last save_total_limit)
    metrics.jsonl           one JSON line per logged step (step, loss, accuracy, grad_norm,
                            learning_rate, samples_per_second) and per eval (eval_loss, ...)
    training_args.json      the settings (a rerun with different data settings is refused)
    samples/step_<N>.png    images of eval_prompts at fixed seeds, at every eval
    runs/, wandb/           with report_to: TensorBoard event files, the W&B run (its id in wandb_run_id)
    config.json, model.safetensors, vqgan/, tokenizer files, README.md
                            the exported pipeline: dalle_flax.pipeline("text-to-image", model=output_dir)

Running again on the same ``output_dir`` resumes from the newest checkpoint with the same
batches and dropout keys, so ``metrics.jsonl`` continues exactly as the uninterrupted run's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..hub_utils import atomic_write, atomic_write_json
from ..image_utils import make_image_grid, to_pil
from ..modeling_flax_dalle_mini import FlaxDalleMiniForConditionalGeneration
from ..pipelines.loading import DalleMiniPipelineModel
from ..sharding import make_mesh
from .arguments import TrainingArguments, parse_mesh
from .checkpoint import Checkpoints
from .data import load_encoded_rows, make_dataset
from .optim import build_optimizer, learning_rate_schedule
from .reporting import Reporters, make_reporters, resolve_report_to, tagged
from .step import (abstract_train_state, init_train_state, make_eval_step, make_train_step, merged_params,
                   shard_batch)

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "train"]

METRICS_FILE, ARGS_FILE = "metrics.jsonl", "training_args.json"
# Settings a resumed run must share with the run that wrote the checkpoints.
_RESUME_KEYS = ("model", "train_data", "from_scratch", "train_batch_size", "seed", "blank_caption_prob",
                "optimizer", "gradient_accumulation_steps", "trainable", "lora_rank", "lora_alpha", "mesh")


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` did.

  Attributes:
    output_dir: the run's folder (holds the exported pipeline).
    steps: train steps done in all (resumed runs included).
    resumed_from: the checkpoint step this call started from, or None.
    last_metrics: the last logged train metrics; eval: the last eval metrics (or None).
    pushed: the commit URL when pushed to the Hub.
  """

  output_dir: Path
  steps: int
  resumed_from: int | None
  last_metrics: dict[str, float]
  eval: dict[str, float] | None = None
  pushed: str | None = None


def train(args: TrainingArguments) -> TrainResult:
  """Runs (or resumes) the fine-tuning described by ``args``; see the module docstring."""
  _init_distributed(args)
  output_dir = Path(args.output_dir)
  dp, mp = parse_mesh(args.mesh, jax.device_count())
  _check_batch_size(args.train_batch_size, dp)
  if jax.process_index() == 0:
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_args(output_dir, args)
    resolve_report_to(args.report_to)  # a missing tensorboardX / wandb fails here, before the model loads
  mesh = make_mesh(dp=dp, mp=mp)

  # 1. The model, its VQGAN and processor; the training view of the text model.
  components = DalleMiniPipelineModel.from_pretrained(args.model, vqgan=args.vqgan)
  config = copy.deepcopy(components.text_model.config)
  config.gradient_checkpointing = bool(args.gradient_checkpointing)
  model = FlaxDalleMiniForConditionalGeneration(config, dtype=jnp.dtype(args.dtype), _do_init=False)
  processor = components.processor

  # 2. Data, validated before anything compiles: every process reads all rows and keeps its
  #    slice of each global batch, so the batches do not depend on the number of processes.
  per_process = args.train_batch_size // jax.process_count()
  rows = load_encoded_rows(args.train_data, config, process_index=0, process_count=1)
  iterator = iter(make_dataset(rows, processor, config, batch_size=per_process, seed=args.seed,
                               blank_caption_prob=args.blank_caption_prob, process_slice=_process_slice()))
  eval_rows = load_encoded_rows(args.eval_data, config, process_index=0, process_count=1) if args.eval_data else None

  # 3. State: fresh, or the newest checkpoint (which also repositions the data iterator).
  settings = args.optimizer_settings()
  optimizer = build_optimizer(settings)
  lora = args.lora_settings()  # None: the weights train; else only LoRA adapters (merged for eval and export)
  schedule = learning_rate_schedule(settings)
  checkpoints = Checkpoints(output_dir / "checkpoints", save_every=args.save_steps, keep=args.save_total_limit)
  resumed_from = checkpoints.latest_step
  if resumed_from is not None:
    state = checkpoints.restore(resumed_from, abstract_train_state(model.params_shape_tree, optimizer, mesh, lora=lora),
                                iterator)
    logger.info("Resuming %s from step %d", output_dir, resumed_from)
  else:
    params = None if args.from_scratch else components.text_model.params
    state = init_train_state(model, params, optimizer, mesh, seed=args.seed, lora=lora)
  components.text_model.params = None  # the state holds the only copy from here on
  start = int(_to_host(state.step))
  metrics_log = _MetricsLog(output_dir / METRICS_FILE, keep_until=start)
  train_step = make_train_step(model, optimizer, mesh, trainable=settings.trainable, lora=lora)
  eval_step = make_eval_step(model, mesh) if eval_rows is not None else None

  # 4. The loop.
  last: dict[str, float] = {}
  last_eval = None
  reporters = make_reporters(args.report_to, output_dir, args.to_dict(), start_step=start)
  window_start, window_steps = time.perf_counter(), 0
  bar = tqdm(total=args.max_steps, initial=start, desc="Training", unit="step",
             disable=jax.process_index() != 0)
  try:
    for step in range(start + 1, args.max_steps + 1):
      state, metrics = train_step(state, shard_batch(next(iterator), mesh))
      window_steps += 1
      if step % args.logging_steps == 0 or step == args.max_steps:
        elapsed = time.perf_counter() - window_start
        last = {k: float(v) for k, v in _to_host(metrics).items()}
        last["learning_rate"] = float(schedule(step // settings.gradient_accumulation_steps))
        last["samples_per_second"] = window_steps * args.train_batch_size / max(elapsed, 1e-9)
        metrics_log.write({"step": step, **last})
        reporters.log_metrics(tagged("train", last), step)
        bar.set_postfix(loss=f"{last['loss']:.4f}")
        window_start, window_steps = time.perf_counter(), 0
      if eval_step is not None and args.eval_steps and step % args.eval_steps == 0:
        last_eval = _evaluate(eval_step, merged_params(state, lora), eval_rows, processor, config, args, mesh)
        metrics_log.write({"step": step, **last_eval})
        reporters.log_metrics(tagged("eval", last_eval), step)
        _write_samples(components, merged_params(state, lora), args, output_dir, step, reporters)
      checkpoints.save(step, state, iterator, force=step == args.max_steps)
      if args.export_steps and step % args.export_steps == 0 and step != args.max_steps:
        _export(components, merged_params(state, lora), output_dir)
        components.text_model.params = None
      bar.update(1)
  finally:
    bar.close()
    checkpoints.close()
    reporters.close()

  # 5. Export the pipeline folder, with a card that records the run (and push it).
  components.training_info = _training_info(args, len(rows), last, last_eval)
  _export(components, merged_params(state, lora), output_dir)  # LoRA: plain merged weights
  pushed = None
  if args.push_to_hub and jax.process_index() == 0:
    pushed = components.push_to_hub(args.push_to_hub, token=args.hub_token, private=args.hub_private,
                                    commit_message=f"Fine-tuned for {args.max_steps} steps with dalle-flax")
  return TrainResult(output_dir, args.max_steps, resumed_from, last, last_eval, pushed)


# --- helpers of train() ---------------------------------------------------------------------------
def _process_slice() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def _to_host(tree: Any) -> Any:
  """Replicated (global) arrays -> numpy, on every process (each holds a full copy)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else x, tree)


def _training_info(args: TrainingArguments, rows: int, last: dict[str, float], last_eval: dict[str, float] | None
                   ) -> dict[str, Any]:
  """What the exported model card says about the run."""
  shown = ("optimizer", "learning_rate", "warmup_steps", "schedule", "weight_decay", "max_grad_norm",
           "gradient_accumulation_steps", "trainable", "lora_rank", "lora_alpha", "blank_caption_prob", "dtype",
           "seed", "mesh")
  settings = args.to_dict()
  return {"base_model": "random init (" + args.model + " config)" if args.from_scratch else args.model,
          "train_data": args.train_data, "train_rows": rows, "steps": args.max_steps,
          "train_batch_size": args.train_batch_size, "final_loss": last.get("loss"),
          "final_eval_loss": (last_eval or {}).get("eval_loss"),
          "hyperparameters": {k: settings[k] for k in shown if settings[k] is not None
                              and not (k.startswith("lora_") and not args.lora_rank)}}


def _init_distributed(args: TrainingArguments) -> None:
  """``jax.distributed.initialize`` when arguments ask for several processes, or with no arguments
  (JAX reads the cluster from the environment) when a SLURM or Open MPI job has several tasks;
  before any computation. Cloud TPU pods need nothing: JAX forms the cluster itself."""
  wanted = [args.coordinator_address, args.num_processes, args.process_id]
  if all(value is None for value in wanted):
    if _cluster_job_tasks() > 1 and not jax.distributed.is_initialized():
      jax.distributed.initialize()
    return
  if any(value is None for value in wanted):
    raise ValueError("coordinator_address, num_processes and process_id go together (got "
                     f"{wanted}); on TPU pods, SLURM or Open MPI leave all three unset.")
  if jax.distributed.is_initialized():
    return  # already initialised by the caller
  jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                             process_id=args.process_id)


def _cluster_job_tasks() -> int:
  """Tasks of the SLURM (``srun``) or Open MPI (``mpirun``) job this process belongs to (1: none)."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    value = os.environ.get(name, "")
    if value.isdigit():
      return int(value)
  return 1


def _check_batch_size(batch_size: int, dp: int) -> None:
  processes = jax.process_count()
  if batch_size % dp or batch_size % processes:
    raise ValueError(f"train_batch_size {batch_size} must be divisible by the mesh's dp={dp} and by the "
                     f"{processes} process(es); use a multiple of {np.lcm(dp, processes)}.")


def _check_or_write_args(output_dir: Path, args: Any, keys: tuple[str, ...] = _RESUME_KEYS) -> None:
  """Refuses to resume a run whose ``keys`` settings (data, optimizer) differ; records the settings."""
  path = output_dir / ARGS_FILE
  current = args.to_dict()
  if path.exists() and (output_dir / "checkpoints").is_dir():
    previous = json.loads(path.read_text())
    changed = {k: (previous.get(k), current[k]) for k in keys if previous.get(k) != current[k]}
    if changed:
      details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
      raise ValueError(f"{output_dir} holds a run with other settings ({details}); resume it with the same "
                       "settings, or pick a new output_dir.")
  atomic_write_json(path, current)


class _MetricsLog:
  """``metrics.jsonl``, written by process 0; lines after the resumed step are dropped first."""

  def __init__(self, path: Path, keep_until: int):
    self.path = path
    self.enabled = jax.process_index() == 0
    if self.enabled and path.exists():
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= keep_until]
      with atomic_write(path, "w") as f:
        f.writelines(line + "\n" for line in kept)

  def write(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with self.path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _evaluate(eval_step: Any, params: Any, rows: Any, processor: Any, config: Any, args: TrainingArguments,
              mesh: Any) -> dict[str, float]:
  """Mean eval loss and accuracy over whole batches of the eval rows (no blank captions)."""
  per_process = args.train_batch_size // jax.process_count()
  if len(rows) < args.train_batch_size:
    raise ValueError(f"eval_data has {len(rows)} rows, fewer than one batch ({args.train_batch_size}); "
                     "add rows or lower train_batch_size.")
  batches = make_dataset(rows, processor, config, batch_size=per_process, seed=args.seed, blank_caption_prob=0.0,
                         shuffle=False, num_epochs=1, process_slice=_process_slice())
  results = [_to_host(eval_step(params, shard_batch(batch, mesh))) for batch in batches]
  return {f"eval_{k}": float(np.mean([r[k] for r in results])) for k in ("loss", "accuracy")}


def _write_samples(components: DalleMiniPipelineModel, params: Any, args: TrainingArguments, output_dir: Path,
                   step: int, reporters: Reporters) -> None:
  """One grid of the eval prompts' images (seed i for prompt i), written and reported by process 0."""
  if not args.eval_prompts:
    return
  if jax.process_count() > 1:
    logger.info("Sample images are written by single-process runs only; skipped at step %d.", step)
    return
  inputs = components.processor(list(args.eval_prompts))
  out = components.text_model.generate(**inputs, params=params, seed=list(range(len(args.eval_prompts))))
  images = to_pil(np.clip(np.asarray(components.vqgan.decode_code(np.asarray(out.image_tokens))), 0.0, 1.0))
  if jax.process_index() == 0:
    path = output_dir / "samples" / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_image_grid(images, rows=1, cols=len(images))
    with atomic_write(path) as f:
      grid.save(f, format="PNG")
    reporters.log_image("eval/samples", grid, step, caption=" | ".join(args.eval_prompts))


def _export(components: DalleMiniPipelineModel, params: Any, output_dir: Path) -> None:
  """Writes the pipeline folder with the trained parameters (gathered from every host); the
  text model keeps the host copy (for a push)."""
  components.text_model.params = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  if jax.process_index() == 0:
    components.save_pretrained(output_dir)
