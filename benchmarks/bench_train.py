"""Benchmark the jitted train step on the real DALL·E mini config (random weights), plus memory estimates.

Usage: ``python benchmarks/bench_train.py [--model mini|mega] [--batch 2] [--steps 3]
[--remat off|on|both] [--dtype float32|bfloat16] [--layout unscanned|scanned] [--estimates-only]
[--compile-only] [--meshes dp=8 dp=4,mp=2 dp=1,mp=8] [--tiny]``

Prints one JSON object. The step is :func:`dalle_flax.training.step.make_train_step` (AdamW behind
global-norm clipping, the ``dalle-flax train`` defaults) on a one-device mesh, float32 parameters,
computation in ``--dtype``, ``batch`` rows of ``max_text_length`` text and ``image_length`` image
tokens. Per remat setting:

- trace + lower and XLA compile seconds; seconds per step, best of ``--steps`` timed steps after
  one warm-up step (the median next to it; on a shared machine the best run is the one least
  disturbed by neighbours), samples/s and image tokens/s;
- FLOPs per step: XLA's cost analysis of the compiled step (everything it runs: forward, backward,
  the remat recomputation, the optimizer; a scanned layout's loop body is counted once, so use the
  default unscanned layout, which is what ``dalle-flax train`` runs) and an analytic count
  (:func:`analytic_flops`), each as GFLOP/s and as a fraction of this machine's matmul throughput,
  measured in the same run (best of 9 jitted matmuls of the model's size, before and after the timed
  steps, the higher reading kept);
- the compiled step's memory analysis (argument / output / alias / temp bytes) and the peak RSS
  of the process during that setting (Linux: VmHWM, reset before each setting once the previous
  one's buffers are freed; ``rss_at_start_gib`` is where it started).

Then, with ``jax.eval_shape`` only (nothing allocated), for mini and mega: parameter, gradient,
AdamW and Adafactor bytes in all and per device for each mesh under the partition rules of
:mod:`dalle_flax.sharding` (a leaf sharded on "mp" divides by mp; "dp" replicates everything,
optimizer state included). ``--compile-only`` compiles the step for abstract state instead of
running it (memory analysis and FLOPs of e.g. mega, without allocating its 29 GiB of parameters and AdamW state).
``--model mega`` never runs a step. ``--tiny`` benchmarks a tiny config (the smoke test).
Memory figures are GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params
from dalle_flax.sharding import batch_sharding, make_mesh
from dalle_flax.training.optim import OptimizerSettings, build_optimizer
from dalle_flax.training.step import (
  abstract_train_state,
  init_train_state,
  make_train_step,
  shard_batch,
  train_state_shardings,
)

# The released mini-1 and mega-1 configs (tests/unit/test_modeling_dalle_mini.py checks their
# 437,833,712 and 2,587,521,024 parameters).
MINI = {
    "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
    "decoder_attention_heads": 16, "encoder_ffn_dim": 2730, "decoder_ffn_dim": 2730, "encoder_vocab_size": 50264,
    "image_vocab_size": 16384, "image_length": 256, "max_text_length": 64, "bos_token_id": 16385,
    "eos_token_id": 16385, "pad_token_id": 16385, "decoder_start_token_id": 16384, "dropout": 0.0, "init_std": 0.02,
}
MEGA = dict(MINI, d_model=2048, encoder_layers=24, decoder_layers=24, encoder_attention_heads=32,
            decoder_attention_heads=32, encoder_ffn_dim=4096, decoder_ffn_dim=4096, encoder_vocab_size=50272,
            image_vocab_size=16415, init_std=0.01)
TINY = dict(MINI, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, encoder_vocab_size=1000,
            image_vocab_size=128, image_length=32, max_text_length=16, bos_token_id=129, eos_token_id=129,
            pad_token_id=129, decoder_start_token_id=128)
CONFIGS = {"mini": MINI, "mega": MEGA, "tiny": TINY}
GIB = 2**30
ANALYTIC_METHOD = ("matmuls only, 2 FLOPs per multiply-add: 6 x kernel params x the tokens each kernel sees "
                   "(encoder: text; decoder: image, cross-attention k/v: text) + attention scores and weighted "
                   "sums; with remat the layers' forward once more, less the feed-forward output projections; "
                   "naive_6_params_tokens = 6 x all params x (text + image tokens), an overcount")


def build_model(cfg: dict, *, remat: bool, layout: str, dtype: str) -> FlaxDalleMiniForConditionalGeneration:
  config = DalleBartConfig(**cfg, gradient_checkpointing=remat, use_scan=layout == "scanned")
  return FlaxDalleMiniForConditionalGeneration(config, dtype=jnp.dtype(dtype), _do_init=False)


def random_params(shapes: dict, seed: int = 0) -> dict:
  """float32 Normal(0, 0.02) for every leaf, scales near 1, made with numpy (module.init is slower)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in flatten_params(shapes).items():
    values = rng.standard_normal(leaf.shape, dtype=np.float32) * 0.02
    flat[path] = values + 1.0 if path.endswith("scale") else values
  return unflatten_params(flat)


def random_batch(cfg: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random text ids (no padding) and image codes; decoder inputs are the codes shifted right."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, cfg["image_vocab_size"], (batch, cfg["image_length"]), dtype=np.int32)
  start = np.full((batch, 1), cfg["decoder_start_token_id"], np.int32)
  return {
      "input_ids": rng.integers(0, cfg["encoder_vocab_size"], (batch, cfg["max_text_length"]), dtype=np.int32),
      "attention_mask": np.ones((batch, cfg["max_text_length"]), np.int32),
      "decoder_input_ids": np.concatenate([start, labels[:, :-1]], axis=1),
      "labels": labels,
  }


def analytic_flops(cfg: dict, batch: int) -> dict[str, int]:
  """FLOPs of one train step counted from the config: matmuls only, 2 FLOPs per multiply-add.

  Per row, with t text and n image tokens: each encoder kernel sees t tokens; each decoder
  self-attention, cross-attention q/out, GLU kernel and the lm_head sees n, the cross-attention
  k/v kernels see t; attention adds 4·t²·d (encoder), 4·n²·d + 4·n·t·d (decoder) per layer
  (scores and weighted sum; the causal mask does not skip work). Training is 3x the forward
  ("model" FLOPs, the 6 x params x tokens rule applied per kernel); remat re-runs the layers'
  forward once more ("with_remat"), less each feed-forward output projection (``GLU_0/Dense_2``:
  its output only feeds the residual sum, so the backward pass never needs it and XLA drops its
  recomputation). Embedding lookups, norms, softmax, the loss and the optimizer are not counted.
  ``naive_6_params_tokens`` (in the report) is 6 x all parameters x (t + n), which overcounts:
  encoder weights never see image tokens and embeddings are lookups.
  """
  d, t, n, v = cfg["d_model"], cfg["max_text_length"], cfg["image_length"], cfg["image_vocab_size"] + 1
  fe, fd, le, ld = cfg["encoder_ffn_dim"], cfg["decoder_ffn_dim"], cfg["encoder_layers"], cfg["decoder_layers"]
  enc_weights = 2 * t * (4 * d * d + 3 * d * fe)
  dec_weights = 2 * n * (6 * d * d + 3 * d * fd) + 2 * t * 2 * d * d
  enc_attention, dec_attention = 4 * t * t * d, 4 * n * n * d + 4 * n * t * d
  layers = le * (enc_weights + enc_attention) + ld * (dec_weights + dec_attention)
  recomputed = layers - le * 2 * t * fe * d - ld * 2 * n * fd * d  # without the output projections
  forward = layers + 2 * n * d * v
  return {
      "forward": batch * forward,
      "model": batch * 3 * forward,
      "with_remat": batch * (3 * forward + recomputed),
      "attention_share": round((le * enc_attention + ld * dec_attention) / forward, 4),
  }


def kernel_params(cfg: dict) -> int:
  """Parameters of the kernels :func:`analytic_flops` counts (all ``kernel`` leaves)."""
  d, fe, fd = cfg["d_model"], cfg["encoder_ffn_dim"], cfg["decoder_ffn_dim"]
  return (cfg["encoder_layers"] * (4 * d * d + 3 * d * fe) + cfg["decoder_layers"] * (8 * d * d + 3 * d * fd)
          + d * (cfg["image_vocab_size"] + 1))


def measure_matmul_gflops(m: int, k: int, n: int, dtype: str, repeats: int = 9) -> float:
  """GFLOP/s of a jitted (m, k) @ (k, n) matmul: best of ``repeats``."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k), np.float32), dtype)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n), np.float32), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * m * k * n / best / 1e9


def sig(x: float, digits: int = 4) -> float:
  """``x`` rounded to ``digits`` significant digits (memory figures span 1e-4 to 1e2 GiB)."""
  return float(f"{x:.{digits}g}")


def tree_gib(tree) -> float:
  return sum(np.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)) / GIB


def per_device_gib(tree, shardings) -> float:
  """Bytes one device holds of ``tree`` under ``shardings`` (same structure), in GiB."""
  return sum(np.prod(s.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
             for leaf, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)) / GIB


def parse_mesh(text: str) -> tuple[int, int]:
  sizes = dict(part.split("=") for part in text.split(","))
  if not set(sizes) <= {"dp", "mp"}:
    raise ValueError(f"a mesh is 'dp=4,mp=2' (dp and mp only), got {text!r}.")
  return int(sizes.get("dp", 1)), int(sizes.get("mp", 1))


def memory_estimates(cfg: dict, meshes: list[str]) -> dict:
  """Parameter, gradient and optimizer-state GiB, whole and per device, from ``jax.eval_shape``."""
  model = build_model(cfg, remat=False, layout="scanned", dtype="float32")  # layout does not change bytes
  params = model.params_shape_tree  # float32
  optimizers = {name: build_optimizer(OptimizerSettings(optimizer=name)) for name in ("adamw", "adafactor")}
  states = {name: jax.eval_shape(tx.init, params) for name, tx in optimizers.items()}
  report = {"params": model.num_parameters(params), "params_gib": sig(tree_gib(params)),
            "grads_gib": sig(tree_gib(params)),  # float32, like the parameters
            **{f"{name}_state_gib": sig(tree_gib(state)) for name, state in states.items()},
            "per_device": []}
  for text in meshes:
    dp, mp = parse_mesh(text)
    mesh = AbstractMesh((dp, mp), ("dp", "mp"))
    row = {"mesh": f"dp={dp},mp={mp}"}
    for name, tx in optimizers.items():
      shardings = train_state_shardings(params, tx, mesh)
      param_gib = per_device_gib(params, shardings.params)  # gradients take their parameter's sharding
      state_gib = per_device_gib(states[name], shardings.opt_state)
      row.update(params_gib=sig(param_gib), grads_gib=sig(param_gib))
      row[f"{name}_state_gib"] = sig(state_gib)
      row[f"total_{name}_gib"] = sig(2 * param_gib + state_gib)
    report["per_device"].append(row)
  return report


def memory_stats(compiled) -> dict:
  stats = compiled.memory_analysis()
  names = ("argument", "output", "alias", "temp", "generated_code")
  return {f"{k}_gib": sig(getattr(stats, f"{k}_size_in_bytes") / GIB) for k in names}


def xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost  # older jax: one dict per device
  return {"flops": int(cost.get("flops", 0)), "bytes_accessed": int(cost.get("bytes accessed", 0))}


def release_memory() -> None:
  """Frees dropped buffers and hands the heap's free pages back to the OS (glibc), so that the
  next setting's peak RSS does not start from the previous one's leftovers."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def current_rss_gib() -> float | None:
  try:
    with open("/proc/self/status") as f:
      return round(next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20, 3)
  except (OSError, StopIteration):
    return None


def reset_peak_rss() -> bool:
  """Resets the process's VmHWM (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def peak_rss_gib(since_reset: bool) -> float:
  if since_reset:
    with open("/proc/self/status") as f:
      kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
  else:  # ru_maxrss: KiB on Linux, bytes on macOS; the whole process's peak
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 if sys.platform != "darwin" else 1024)
  return round(kib / 2**20, 3)


def batch_shapes(cfg: dict, batch: int, mesh) -> dict:
  t, n = cfg["max_text_length"], cfg["image_length"]
  shapes = {"input_ids": t, "attention_mask": t, "decoder_input_ids": n, "labels": n}
  return {k: jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding(mesh))
          for k, length in shapes.items()}


def compile_step(cfg: dict, args: argparse.Namespace, remat: bool) -> dict:
  """Compiles the step for abstract state (nothing allocated): compile time, memory, FLOPs."""
  model = build_model(cfg, remat=remat, layout=args.layout, dtype=args.dtype)
  optimizer = build_optimizer(OptimizerSettings())
  mesh = make_mesh(dp=1, mp=1, devices=jax.devices()[:1])
  t0 = time.perf_counter()
  lowered = make_train_step(model, optimizer, mesh).lower(
      abstract_train_state(model.params_shape_tree, optimizer, mesh), batch_shapes(cfg, args.batch, mesh))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"remat": remat, "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
          "xla": xla_cost(compiled), "memory_analysis": memory_stats(compiled)}


def bench_step(cfg: dict, args: argparse.Namespace, remat: bool) -> dict:
  """Builds the state, compiles and times the step for one remat setting."""
  release_memory()
  rss_at_start, reset = current_rss_gib(), reset_peak_rss()
  model = build_model(cfg, remat=remat, layout=args.layout, dtype=args.dtype)
  optimizer = build_optimizer(OptimizerSettings())
  mesh = make_mesh(dp=1, mp=1, devices=jax.devices()[:1])
  params = random_params(model.params_shape_tree)
  state = init_train_state(model, params, optimizer, mesh)
  del params  # the state holds its own copy
  gc.collect()
  batch = shard_batch(random_batch(cfg, args.batch), mesh)
  t0 = time.perf_counter()
  lowered = make_train_step(model, optimizer, mesh).lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  lower_s, compile_s = t1 - t0, time.perf_counter() - t1
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready((state, metrics))
  losses, times = [float(metrics["loss"])], []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  best, median = min(times), statistics.median(times)
  image_tokens = args.batch * cfg["image_length"]
  result = {
      "remat": remat, "lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2),
      "step_s": round(best, 3), "step_s_median": round(median, 3),
      "samples_per_s": round(args.batch / best, 3), "samples_per_s_median": round(args.batch / median, 3),
      "image_tokens_per_s": round(image_tokens / best, 1),
      "image_tokens_per_s_median": round(image_tokens / median, 1),
      "xla": xla_cost(compiled), "memory_analysis": memory_stats(compiled),
      "losses": [round(x, 4) for x in losses],
      "rss_at_start_gib": rss_at_start, "peak_rss_gib": peak_rss_gib(reset),
      "peak_rss_scope": "this setting" if reset else "whole process",
  }
  del state, metrics, compiled, lowered
  release_memory()
  return result


def add_throughput(run: dict, cfg: dict, batch: int, matmul_gflops: float) -> None:
  """GFLOP/s of a run's best step (XLA's count and the analytic one) and their fraction of the probe."""
  flops = analytic_flops(cfg, batch)
  run["analytic_flops"] = flops["with_remat" if run["remat"] else "model"]
  run["analytic_model_flops"] = flops["model"]
  if "step_s" not in run:
    return
  for name, count in (("xla", run["xla"]["flops"]), ("analytic", run["analytic_flops"]),
                      ("analytic_model", flops["model"])):
    gflops = count / run["step_s"] / 1e9
    run[f"{name}_gflops_per_s"] = round(gflops, 1)
    run[f"{name}_fraction_of_matmul"] = round(gflops / matmul_gflops, 3)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=["mini", "mega"], default="mini")
  parser.add_argument("--batch", type=int, default=2, help="rows per step")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up step)")
  parser.add_argument("--remat", choices=["off", "on", "both"], default="both")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="computation dtype (parameters and optimizer state stay float32)")
  parser.add_argument("--layout", choices=["unscanned", "scanned"], default="unscanned",
                      help="layer layout; dalle-flax train runs unscanned (XLA counts a scanned body once)")
  parser.add_argument("--meshes", nargs="+", default=["dp=8", "dp=4,mp=2", "dp=2,mp=4", "dp=1,mp=8"],
                      help="meshes of the per-device memory estimates")
  parser.add_argument("--estimates-only", action="store_true", help="only the jax.eval_shape memory estimates")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile the step for abstract state (no allocation) instead of running it")
  parser.add_argument("--tiny", action="store_true", help="a tiny config instead of --model (smoke test)")
  args = parser.parse_args()
  if args.batch < 1 or args.steps < 1:
    parser.error(f"--batch and --steps must be >= 1, got {args.batch} and {args.steps}.")
  name = "tiny" if args.tiny else args.model
  run_steps = not (args.estimates_only or args.compile_only)
  if name == "mega" and run_steps:
    parser.error("--model mega runs no step here (29 GiB of state alone); add --estimates-only or --compile-only.")
  cfg = CONFIGS[name]
  remats = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
  matmul_shape = (args.batch * (cfg["max_text_length"] + cfg["image_length"]), cfg["d_model"], 4 * cfg["d_model"])
  report = {
      "model": name, "params": build_model(cfg, remat=False, layout="scanned", dtype="float32").num_parameters(),
      "dtype": args.dtype, "param_dtype": "float32", "layout": args.layout, "batch": args.batch,
      "text_tokens_per_row": cfg["max_text_length"], "image_tokens_per_row": cfg["image_length"],
      "optimizer": "AdamW (optax.adamw, lr 1e-4) behind clip_by_global_norm(1.0), dropout 0",
      "backend": jax.default_backend(), "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
      "jax": jax.__version__, "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "analytic_flops_method": ANALYTIC_METHOD,
  }
  naive = 6 * report["params"] * (cfg["max_text_length"] + cfg["image_length"]) * args.batch
  report["analytic_flops_per_step"] = {**analytic_flops(cfg, args.batch), "naive_6_params_tokens": naive}
  if not args.estimates_only:
    probe = {"shape": list(matmul_shape), "method": "best of 9 jitted (m, k) @ (k, n) matmuls, before and "
             "after the timed steps, the higher reading kept"}
    dtypes = sorted({"float32", args.dtype})
    for dtype in dtypes:
      probe[f"gflops_per_s_{dtype}"] = measure_matmul_gflops(*matmul_shape, dtype)
    runs = []
    for remat in remats:
      runs.append(bench_step(cfg, args, remat) if run_steps else compile_step(cfg, args, remat))
      print(json.dumps(runs[-1]), file=sys.stderr)
    for dtype in dtypes:  # the machine's throughput drifts with its neighbours: keep the higher reading
      key = f"gflops_per_s_{dtype}"
      probe[key] = round(max(probe[key], measure_matmul_gflops(*matmul_shape, dtype)), 1)
    report["matmul_probe"] = probe
    for run in runs:
      add_throughput(run, cfg, args.batch, probe[f"gflops_per_s_{args.dtype}"])
    report["runs"] = runs
  estimate_models = ["tiny"] if args.tiny else ["mini", "mega"]
  report["memory_estimates"] = {
      "method": "jax.eval_shape, float32 parameters; per device: the partition rules, dp replicates; "
                "activations not included (see runs[].memory_analysis.temp_gib)",
      **{m: memory_estimates(CONFIGS[m], args.meshes) for m in estimate_models},
  }
  report["peak_rss_gib"] = peak_rss_gib(False)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
