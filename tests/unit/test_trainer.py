"""The fine-tuning loop (dalle_flax.training.train) end to end on the bundled tiny pipeline:
the loss falls, a resumed run continues the uninterrupted run's metrics exactly, the exported
folder loads as a pipeline and generates."""

import json
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dalle_flax
from dalle_flax.training import TrainingArguments, train

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]


def write_encoded(folder: Path, rows: int = 32, image_length: int = 16) -> Path:
  """Captions -> fixed code patterns (caption k: codes (k * 7 + i) % 64), two shards."""
  folder.mkdir(parents=True, exist_ok=True)
  captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
  codes = [[(CAPTIONS.index(c) * 7 + i) % 64 for i in range(image_length)] for c in captions]
  half = rows // 2
  for k, part in enumerate((slice(0, half), slice(half, rows))):
    table = pa.table({"caption": captions[part], "encoding": pa.array(codes[part], pa.list_(pa.int32()))})
    pq.write_table(table, folder / f"{k:05d}.parquet")
  return folder


def arguments(tmp_path, **overrides):
  settings = dict(model=str(TINY), train_data=str(write_encoded(tmp_path / "data")), output_dir=str(tmp_path / "run"),
                  train_batch_size=8, max_steps=12, learning_rate=3e-3, logging_steps=1, save_steps=4, seed=1,
                  blank_caption_prob=0.0)
  return TrainingArguments(**{**settings, **overrides})


def read_metrics(run: Path):
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_the_export_is_a_pipeline(tmp_path):
  args = arguments(tmp_path, max_steps=30, eval_data=str(tmp_path / "data"), eval_steps=15,
                   eval_prompts=("a red square", "a blue circle"))
  result = train(args)
  losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
  assert len(losses) == 30 and losses[-1] < 0.5 * losses[0], losses
  assert result.eval is not None and result.eval["eval_loss"] < losses[0]
  assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["step_0000015.png", "step_0000030.png"]
  pipe = dalle_flax.pipeline("text-to-image", model=str(result.output_dir))
  pipe.set_progress_bar_config(disable=True)
  tokens = pipe("a red square", seed=0, output_type="tokens", do_sample=False)
  assert tokens.shape == (1, 16)
  learned = (np.asarray(tokens[0]) == (np.arange(16) % 64)).mean()
  assert learned > 0.5, tokens  # greedy decoding recalls the caption's pattern


def test_resumed_run_continues_the_metrics_exactly(tmp_path):
  full = train(arguments(tmp_path / "a"))
  expected = [m for m in read_metrics(full.output_dir)]
  first = train(arguments(tmp_path / "b", max_steps=8))  # stops after the step-8 checkpoint
  assert first.resumed_from is None
  # a crash after step 8 would leave metrics past the checkpoint; the resumed run drops them
  with (first.output_dir / "metrics.jsonl").open("a") as f:
    f.write(json.dumps({"step": 9, "loss": 123.0}) + "\n")
  second = train(arguments(tmp_path / "b", max_steps=12))
  assert second.resumed_from == 8
  got = read_metrics(second.output_dir)
  assert [m["step"] for m in got] == list(range(1, 13))
  for want, have in zip(expected, got):
    assert have["loss"] == want["loss"] and have["grad_norm"] == want["grad_norm"], (want, have)


def test_resume_with_other_data_settings_is_refused(tmp_path):
  train(arguments(tmp_path, max_steps=4))
  with pytest.raises(ValueError, match=r"train_batch_size: 8 -> 4"):
    train(arguments(tmp_path, max_steps=8, train_batch_size=4))


@pytest.mark.parametrize("overrides, match", [
    ({"mesh": "dp=3"}, r"needs dp x mp = 3 x 1 = 3 devices, but jax sees 1"),
    ({"mesh": "tp=2"}, "mesh must look like 'dp=4,mp=2'"),
    ({"max_steps": 10, "gradient_accumulation_steps": 4}, "multiple of gradient_accumulation_steps"),
    ({"output_dir": ""}, "output_dir is required"),
])
def test_bad_arguments_fail_before_training(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train(arguments(tmp_path, **overrides))


@pytest.mark.slow  # three training processes: about 50 s
def test_train_cli_killed_mid_run_resumes_to_the_same_losses(tmp_path):
  import os
  import signal
  import subprocess
  import sys
  import time

  args = arguments(tmp_path, max_steps=40)
  config = tmp_path / "run.yaml"
  config.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in args.to_dict().items()
                              if v is not None and k != "eval_prompts"))
  command = [sys.executable, "-m", "dalle_flax.cli", "train", str(config), "--output-dir"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  killed = subprocess.Popen(command + [str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
  checkpoints = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and not (checkpoints / "12").is_dir():
    assert killed.poll() is None, killed.stderr.read().decode()[-2000:]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  metrics = tmp_path / "killed" / "metrics.jsonl"
  assert 12 <= len(metrics.read_text().splitlines()) < 40  # really killed mid-run
  resumed = subprocess.run(command + [str(tmp_path / "killed")], env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed at" in resumed.stdout
  whole = subprocess.run(command + [str(tmp_path / "whole")], env=env, capture_output=True, text=True, timeout=300)
  assert whole.returncode == 0, whole.stderr[-2000:]
  want, got = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
  assert [m["step"] for m in got] == list(range(1, 41))
  assert [m["loss"] for m in got] == [m["loss"] for m in want]


def test_train_cli_reads_the_config_file_then_the_flags(tmp_path, monkeypatch, capsys):
  from dalle_flax import cli, training

  seen = {}

  def fake_train(args):
    seen["args"] = args
    return training.TrainResult(Path(args.output_dir), args.max_steps, None, {"loss": 1.0})

  monkeypatch.setattr(training, "train", fake_train)
  config = tmp_path / "run.json"
  config.write_text(json.dumps({"model": "m", "train_data": "d", "output_dir": "o", "max_steps": 100,
                                "learning_rate": 0.01, "eval_prompts": ["a fox"]}))
  assert cli.main(["train", str(config), "--max-steps", "10", "--gradient_checkpointing", "--mesh", "dp=1"]) == 0
  args = seen["args"]
  assert (args.model, args.max_steps, args.learning_rate, args.gradient_checkpointing, args.mesh) == (
      "m", 10, 0.01, True, "dp=1")
  assert args.eval_prompts == ("a fox",) and "trained 10 steps" in capsys.readouterr().out
  config.write_text(json.dumps({"modle": "m"}))
  assert cli.main(["train", str(config)]) == 1
  assert "unknown setting(s) ['modle']" in capsys.readouterr().err


def test_trained_pipeline_is_pushed_with_its_card_and_loads_through_transformers(tmp_path, local_hub):
  pytest.importorskip("torch")
  import transformers

  result = train(arguments(tmp_path, max_steps=4, push_to_hub="me/shapes", learning_rate=2e-3))
  assert result.pushed and "me/shapes" in result.pushed
  card = (result.output_dir / "README.md").read_text()
  assert f"Fine-tuned with `dalle-flax train` from `{TINY}`" in card
  assert "(32 encoded images) for 4 steps of\n8 images" in card
  assert f"Final train loss {result.last_metrics['loss']:.4f}" in card and "| learning_rate | 0.002 |" in card
  assert "lora_rank" not in card  # only LoRA runs list the adapter settings
  hf_pipe = transformers.pipeline("text-to-image", model="me/shapes")
  hf_pipe.set_progress_bar_config(disable=True)
  local = dalle_flax.pipeline("text-to-image", model=str(result.output_dir))
  local.set_progress_bar_config(disable=True)
  pushed_tokens = hf_pipe("a red square", seed=3, output_type="tokens")
  np.testing.assert_array_equal(pushed_tokens, local("a red square", seed=3, output_type="tokens"))
  base = dalle_flax.pipeline("text-to-image", model=str(TINY))
  base.set_progress_bar_config(disable=True)
  assert (np.asarray(pushed_tokens) != np.asarray(base("a red square", seed=3, output_type="tokens"))).any()


TWO_PROCESS_SCRIPT = """
import json, sys
from dalle_flax.training import TrainingArguments, train
settings = json.loads(sys.argv[1])
train(TrainingArguments(**settings))
"""


@pytest.mark.slow  # two jax.distributed processes plus a reference run: about 60 s
def test_two_processes_train_the_losses_of_one(tmp_path):
  import os
  import socket
  import subprocess
  import sys

  reference = train(arguments(tmp_path / "one", max_steps=6))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  base = arguments(tmp_path / "two", max_steps=6).to_dict()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  workers = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT, json.dumps(
      {**base, "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i})],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [w.communicate(timeout=400) for w in workers]
  for worker, (_, err) in zip(workers, outputs):
    assert worker.returncode == 0, err[-3000:]
  want, got = read_metrics(reference.output_dir), read_metrics(tmp_path / "two" / "run")
  assert [m["step"] for m in got] == list(range(1, 7))
  # the same batches and keys; only the gradient all-reduce sums in another order, which Adam's
  # early sign-like steps amplify a little: 1e-5 for 3 steps, 1e-4 over all 6 (measured: 2e-5)
  got_losses, want_losses = [m["loss"] for m in got], [m["loss"] for m in want]
  np.testing.assert_allclose(got_losses[:3], want_losses[:3], rtol=1e-5)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-4)
  exported = dalle_flax.pipeline("text-to-image", model=str(tmp_path / "two" / "run"))
  assert exported.model.text_model.num_parameters() > 0


@pytest.mark.parametrize("env, expect_call", [({"SLURM_NTASKS": "4"}, True), ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
                                              ({"SLURM_NTASKS": "1"}, False), ({}, False)])
def test_cluster_jobs_initialise_jax_distributed_from_the_environment(monkeypatch, env, expect_call):
  from dalle_flax.training import trainer as trainer_module

  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  calls = []
  monkeypatch.setattr(trainer_module.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(trainer_module.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  args = types.SimpleNamespace(coordinator_address=None, num_processes=None, process_id=None)
  trainer_module._init_distributed(args)
  assert calls == ([{}] if expect_call else [])
