"""benchmarks/bench_train.py: a smoke run on the tiny config, and its FLOP and memory arithmetic.

Run: ``python -m pytest tests/unit/test_bench_train.py -q`` (about 30 s on 2 CPU cores).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.modeling_flax_utils import flatten_params

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bench = _load_script()


@pytest.fixture(scope="module")
def tiny_report():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--remat", "both", "--meshes", "dp=8", "dp=4,mp=2"]
  result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_tiny_run_reports_every_figure(tiny_report):
  report = tiny_report
  assert report["model"] == "tiny" and report["batch"] == 2 and report["param_dtype"] == "float32"
  assert {"backend", "device", "cpu_count", "jax", "analytic_flops_method", "peak_rss_gib"} <= set(report)
  assert set(report["analytic_flops_per_step"]) == {"forward", "model", "with_remat", "attention_share",
                                                    "naive_6_params_tokens"}
  assert report["matmul_probe"]["gflops_per_s_float32"] > 0
  assert [run["remat"] for run in report["runs"]] == [False, True]
  for run in report["runs"]:
    assert {"lower_s", "compile_s", "step_s", "step_s_median", "samples_per_s", "samples_per_s_median",
            "image_tokens_per_s", "image_tokens_per_s_median", "xla_gflops_per_s", "xla_fraction_of_matmul",
            "analytic_gflops_per_s", "analytic_fraction_of_matmul", "analytic_model_gflops_per_s",
            "peak_rss_gib"} <= set(run)
    assert set(run["memory_analysis"]) == {"argument_gib", "output_gib", "alias_gib", "temp_gib",
                                           "generated_code_gib"}
    assert run["step_s"] <= run["step_s_median"]
    assert run["image_tokens_per_s"] == pytest.approx(run["samples_per_s"] * 32, rel=1e-2)
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    assert run["losses"][-1] < run["losses"][0]  # the step trains
    # XLA counts every op, the analytic count matmuls only: a little more, never less
    assert 1.0 <= run["xla"]["flops"] / run["analytic_flops"] < 1.3
  off, on = report["runs"]
  assert on["xla"]["flops"] > off["xla"]["flops"]  # remat re-runs the layers' forward
  assert on["analytic_model_flops"] == off["analytic_flops"]
  tiny = report["memory_estimates"]["tiny"]
  assert [row["mesh"] for row in tiny["per_device"]] == ["dp=8,mp=1", "dp=4,mp=2"]


@pytest.mark.parametrize("name", ["tiny", "mini", "mega"])
def test_analytic_count_covers_every_kernel(name):
  cfg = bench.CONFIGS[name]
  tree = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**cfg), _do_init=False).params_shape_tree
  kernels = sum(math.prod(leaf.shape) for path, leaf in flatten_params(tree).items() if path.endswith("kernel"))
  assert bench.kernel_params(cfg) == kernels


def test_memory_estimates_of_mini_and_mega():
  mini = bench.memory_estimates(bench.MINI, ["dp=8", "dp=4,mp=2", "dp=1,mp=8"])
  assert mini["params"] == 437_833_712
  assert mini["params_gib"] == bench.sig(437_833_712 * 4 / 2**30)
  assert mini["adamw_state_gib"] == bench.sig(2 * 437_833_712 * 4 / 2**30)  # mu and nu (+ a count)
  assert mini["adafactor_state_gib"] < 0.01 * mini["params_gib"]  # factored second moments, no momentum
  dp8, mp2, mp8 = mini["per_device"]
  assert dp8["params_gib"] == mini["params_gib"] and dp8["total_adamw_gib"] == bench.sig(4 * 437_833_712 * 4 / 2**30)
  assert mp2["params_gib"] < 0.55 * mini["params_gib"]
  # mini's ffn_dim 2730 does not divide by 8: its GLU kernels stay replicated on mp=8
  assert mp8["params_gib"] > 0.5 * mini["params_gib"]
  mega = bench.memory_estimates(bench.MEGA, ["dp=1,mp=8"])
  assert mega["params"] == 2_587_521_024
  assert mega["per_device"][0]["params_gib"] == pytest.approx(mega["params_gib"] / 8, rel=0.01)


def test_mega_never_runs_a_step():
  result = subprocess.run([sys.executable, str(SCRIPT), "--model", "mega"], check=False, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0 and "--estimates-only" in result.stderr
