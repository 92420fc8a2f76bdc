"""The bundled shapes model: 4 images after the first compile, and a cold `dalle-flax generate`.

Example: ``python benchmarks/bench_bundled.py --runs 5 > bundled.json``

Prints one JSON object:
- ``in_process``: the pipeline loaded once (load seconds), its first 4-image call (trace +
  compile + run) and the median of ``--runs`` further 4-image calls with new seeds (the
  target: under 5 s), each to PIL images;
- ``cold_cli``: wall seconds of ``dalle-flax generate PROMPT --num-images 4`` in a new process
  (interpreter start, imports, load, compile, generate, PNGs written), run twice so the second
  finds the native kernels built (the target: under 20 s);
plus the machine (CPU count, jax backend).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a green triangle on a white background"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--num-images", type=int, default=4)
  parser.add_argument("--model", default=None, help="default: the bundled model")
  args = parser.parse_args()

  import jax

  import dalle_flax
  from dalle_flax.bundled import bundled_model

  model = args.model or str(bundled_model())
  start = time.perf_counter()
  pipe = dalle_flax.pipeline("text-to-image", model=model)
  pipe.set_progress_bar_config(disable=True)
  load = time.perf_counter() - start
  start = time.perf_counter()
  pipe(PROMPT, num_images_per_prompt=args.num_images, seed=0)
  first = time.perf_counter() - start
  times = []
  for run in range(args.runs):
    start = time.perf_counter()
    pipe(PROMPT, num_images_per_prompt=args.num_images, seed=run + 1)
    times.append(time.perf_counter() - start)

  cold = []
  with tempfile.TemporaryDirectory() as out:
    for _ in range(2):
      start = time.perf_counter()
      subprocess.run([sys.executable, "-m", "dalle_flax.cli", "generate", PROMPT, "--num-images", str(args.num_images),
                      "--out", out, "--no-progress", "--model", model], check=True, capture_output=True,
                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
      cold.append(time.perf_counter() - start)

  print(json.dumps({
      "model": model, "num_images": args.num_images, "prompt": PROMPT,
      "in_process": {"load_s": round(load, 3), "first_call_s": round(first, 3),
                     "median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]},
      "cold_cli": {"first_s": round(cold[0], 2), "second_s": round(cold[1], 2)},
      "machine": {"cpus": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
                  "processor": platform.processor() or platform.machine()},
  }, indent=2))


if __name__ == "__main__":
  main()
