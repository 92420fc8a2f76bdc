"""VQGAN decode speed for the released f16_16384 configuration (random weights).

Example: ``python benchmarks/bench_vqgan.py --batch-sizes 1 4 --runs 3 > vqgan.json``

Prints one JSON object: per batch size, the first call (trace + XLA compile + one run), the
compile estimate (first call minus the median run), the timed runs (after one warm-up call,
each ended by ``block_until_ready``) and the median seconds per image; plus peak RSS, init time
and the jax version, backend and device. Decoding goes through the public
``FlaxVQGANModel.decode_code`` (host-side code validation included).
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalle_flax import FlaxVQGANModel, VQGANConfig


def _peak_rss_mib() -> float:
  # ru_maxrss is KiB on Linux, bytes on macOS.
  scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def bench_decode(model: FlaxVQGANModel, batch: int, runs: int, seed: int) -> dict:
  tokens = model.config.latent_resolution ** 2
  codes = np.random.RandomState(seed).randint(0, model.config.n_embed, (batch, tokens)).astype(np.int32)
  start = time.perf_counter()
  model.decode_code(codes).block_until_ready()
  first_call = time.perf_counter() - start
  model.decode_code(codes).block_until_ready()  # warm-up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    model.decode_code(codes).block_until_ready()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
      "batch_size": batch,
      "first_call_s": round(first_call, 3),
      "compile_s_estimate": round(first_call - median, 3),
      "run_s": [round(t, 3) for t in times],
      "median_s": round(median, 3),
      "seconds_per_image": round(median / batch, 3),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
  parser.add_argument("--runs", type=int, default=3, help="timed runs per batch size (median)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  start = time.perf_counter()
  model = FlaxVQGANModel(VQGANConfig(), dtype=jnp.dtype(args.dtype), seed=args.seed)
  jax.block_until_ready(model.params)
  init_s = time.perf_counter() - start

  results = [bench_decode(model, batch, args.runs, args.seed) for batch in args.batch_sizes]
  device = jax.devices()[0]
  print(json.dumps({
      "benchmark": "vqgan_decode",
      "config": "vqgan_imagenet_f16_16384 (random weights), 256 codes -> 256x256x3",
      "dtype": args.dtype,
      "num_parameters": model.num_parameters(),
      "init_s": round(init_s, 3),
      "decode": results,
      "peak_rss_mib": round(_peak_rss_mib(), 1),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
      "python": platform.python_version(),
  }, indent=2))


if __name__ == "__main__":
  main()
