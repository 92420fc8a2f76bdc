"""``report_to``: a tiny training run's TensorBoard event files (read back from their TFRecord
framing) and W&B calls (a fake ``wandb`` module) hold the losses ``metrics.jsonl`` holds, at the
same steps, plus the eval sample grid; names are checked, and missing packages name the pip command."""

import io
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_trainer import arguments, read_metrics

from dalle_flax import cli, training
from dalle_flax.training import train
from dalle_flax.training.reporting import make_reporters, resolve_report_to

TRAIN_KEYS = ("loss", "accuracy", "grad_norm", "learning_rate", "samples_per_second")


def read_events(folder: Path) -> list:
  """Every ``Event`` of the event files in ``folder``, in file then record order.

  TFRecord framing: uint64 length, uint32 masked crc32c of the length, data, uint32 masked crc32c of the data.
  """
  from tensorboardX.proto.event_pb2 import Event
  from tensorboardX.record_writer import masked_crc32c

  events = []
  for path in sorted(folder.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[offset + 8:offset + 12])
      record = data[offset + 12:offset + 12 + length]
      (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
      assert header_crc == masked_crc32c(header) and record_crc == masked_crc32c(record), (path, offset)
      events.append(Event.FromString(record))
      offset += 16 + length
  return events


def scalars(events: list) -> dict[str, dict[int, float]]:
  """tag -> {step: value} of the events' scalar summaries."""
  found: dict[str, dict[int, float]] = {}
  for event in events:
    for value in event.summary.value:
      if value.WhichOneof("value") == "simple_value":
        found.setdefault(value.tag, {})[event.step] = value.simple_value
  return found


class FakeWandb(types.ModuleType):
  """Records ``wandb.init`` keyword arguments and each run's ``log`` / ``finish`` calls."""

  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    fake = self

    class Run:
      id = kwargs["id"]

      def log(self, data, step=None):
        fake.logs.append((dict(data), step))

      def finish(self):
        fake.finished += 1

    return Run()

  class Image:
    def __init__(self, data, caption=None):
      self.data, self.caption = data, caption


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
  """A tiny run reporting to TensorBoard and a fake W&B: 2 steps, then resumed from the step-2
  checkpoint for steps 3 and 4 (eval + samples at step 4)."""
  tmp_path = tmp_path_factory.mktemp("reporting")
  fake = FakeWandb()
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "wandb", fake)
    patch.setenv("WANDB_PROJECT", "shapes")
    for max_steps in (2, 4):
      result = train(arguments(tmp_path, max_steps=max_steps, save_steps=2, eval_data=str(tmp_path / "data"),
                               eval_steps=4, eval_prompts=("a red square",), report_to=["tensorboard", "wandb"]))
    assert result.resumed_from == 2
  return result.output_dir, read_metrics(result.output_dir), fake


def test_tensorboard_events_hold_the_logged_metrics_and_the_sample_grid(reported_run):
  run, metrics, _ = reported_run
  events = read_events(run / "runs")
  assert sorted(event.step for event in events if event.session_log.status == 1) == [0, 2]  # START: purge from
  found = scalars(events)
  train_lines = [m for m in metrics if "loss" in m]
  assert [m["step"] for m in train_lines] == [1, 2, 3, 4]
  for key in TRAIN_KEYS:  # float32 simple_value: the float32 losses exactly, the rest to float32
    assert found[f"train/{key}"] == {m["step"]: np.float32(m[key]) for m in train_lines}, key
  (eval_line,) = [m for m in metrics if "eval_loss" in m]
  assert found["eval/loss"] == {4: np.float32(eval_line["eval_loss"])}
  assert found["eval/accuracy"] == {4: np.float32(eval_line["eval_accuracy"])}
  images = [(event.step, value.image) for event in events for value in event.summary.value
            if value.tag == "eval/samples" and value.WhichOneof("value") == "image"]
  assert [step for step, _ in images] == [4]
  logged = np.asarray(Image.open(io.BytesIO(images[0][1].encoded_image_string)))
  np.testing.assert_array_equal(logged, np.asarray(Image.open(run / "samples" / "step_0000004.png").convert("RGB")))


def test_wandb_gets_the_logged_metrics_with_their_steps(reported_run):
  run, metrics, fake = reported_run
  first, init = fake.inits  # the resumed run continues the first one's W&B run
  assert init["project"] == "shapes" and init["dir"] == str(run) and init["resume"] == "allow"
  assert init["id"] == first["id"] == (run / "wandb_run_id").read_text().strip()
  assert init["config"]["max_steps"] == 4 and init["config"]["report_to"] == ["tensorboard", "wandb"]
  train_logs = [(data, step) for data, step in fake.logs if "train/loss" in data]
  assert train_logs == [({f"train/{k}": m[k] for k in TRAIN_KEYS}, m["step"]) for m in metrics if "loss" in m]
  (eval_line,) = [m for m in metrics if "eval_loss" in m]
  assert ({"eval/loss": eval_line["eval_loss"], "eval/accuracy": eval_line["eval_accuracy"]}, 4) in fake.logs
  (image,) = [(data["eval/samples"], step) for data, step in fake.logs if "eval/samples" in data]
  assert image[1] == 4 and image[0].caption == "a red square" and image[0].data.size[0] > 0
  assert fake.finished == 2


def test_report_to_none_writes_no_runs_folder(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  result = train(arguments(tmp_path, max_steps=1, report_to="none"))
  assert result.steps == 1 and (result.output_dir / "metrics.jsonl").is_file()
  assert not (result.output_dir / "runs").exists() and not fake.inits
  assert arguments(tmp_path, report_to=["none"]).report_to == ()


def test_resumed_runs_purge_tensorboard_and_continue_the_wandb_run(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for start in (0, 8, 0):  # fresh, resumed at the step-8 checkpoint, fresh again
    make_reporters("all", tmp_path, {"seed": 1}, start_step=start).close()
  first, resumed, fresh = (init["id"] for init in fake.inits)
  assert resumed == first and fresh != first and fake.finished == 3
  starts = [event.step for event in read_events(tmp_path / "runs") if event.session_log.status == 1]  # START
  assert sorted(starts) == [0, 0, 8]  # one file each; TensorBoard drops earlier files' events from that step on


def test_bad_report_to_names_the_valid_values(tmp_path, capsys):
  with pytest.raises(ValueError, match=r"'tensorbord' \(did you mean 'tensorboard'\?\); valid values: 'none', "
                                       r"'all', 'tensorboard', 'wandb'"):
    arguments(tmp_path, report_to="tensorbord")
  with pytest.raises(ValueError, match="'none' does not combine with"):
    arguments(tmp_path, report_to=["none", "wandb"])
  assert cli.main(["train", "--model", "m", "--train-data", "d", "--output-dir", "o", "--report-to", "tensorbord"]) == 1
  assert "valid values: 'none', 'all', 'tensorboard', 'wandb'" in capsys.readouterr().err


def test_report_to_from_flags_and_files(tmp_path, monkeypatch):
  seen = []
  monkeypatch.setattr(training, "train", lambda args: seen.append(args.report_to) or training.TrainResult(
      Path(args.output_dir), args.max_steps, None, {"loss": 1.0}))
  config = tmp_path / "run.yaml"
  config.write_text("model: m\ntrain_data: d\noutput_dir: o\nreport_to: wandb\n")
  for flags in (["--report-to", "tensorboard,wandb"], ["--report-to", "tensorboard", "wandb"],
                ["--report_to", "all"], []):
    assert cli.main(["train", str(config), *flags]) == 0
  assert seen == [("tensorboard", "wandb"), ("tensorboard", "wandb"), ("all",), ("wandb",)]


@pytest.mark.parametrize("name, module, command", [("tensorboard", "tensorboardX", "pip install tensorboardX"),
                                                   ("wandb", "wandb", "pip install wandb")])
def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch, name, module, command):
  monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
  with pytest.raises(ImportError, match=f"report_to='{name}' needs the {module} package.*`{command}`"):
    make_reporters(name, tmp_path, {})
  with pytest.raises(ImportError, match=command):  # before the model loads
    train(arguments(tmp_path, report_to=name))
  assert not (tmp_path / "runs").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
  others = {"tensorboard": ("wandb",), "wandb": ("tensorboard",)}[name]
  if others == ("wandb",):
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
  assert resolve_report_to("all") == others  # "all": only the installed ones
