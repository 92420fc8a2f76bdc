"""Training checkpoints (dalle_flax.training.checkpoint): state + data iterator round trips,
keep-N, the save interval, and a killed save that is never restored."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax.training.checkpoint import Checkpoints, abstract_like


def make_state(step):
  return {"step": jnp.int32(step), "params": {"w": jnp.arange(6.0).reshape(2, 3) * step,
                                               "b": jnp.ones((3,), jnp.bfloat16) * step},
          "key": jax.random.key_data(jax.random.key(step))}


def make_iterator(seed=0):
  return iter(grain.MapDataset.range(100).shuffle(seed=seed).repeat().batch(4).to_iter_dataset())


def test_state_and_iterator_round_trip(tmp_path):
  checkpoints = Checkpoints(tmp_path, save_every=1, keep=2)
  iterator = make_iterator()
  for _ in range(3):
    next(iterator)
  state = make_state(3)
  assert checkpoints.save(3, state, iterator)
  expected_next = [np.asarray(next(iterator)) for _ in range(2)]
  checkpoints.close()

  fresh = make_iterator()
  reopened = Checkpoints(tmp_path, save_every=1, keep=2)
  assert reopened.latest_step == 3
  restored = reopened.restore_latest(abstract_like(make_state(0)), fresh)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored["params"]["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(next(fresh)), expected_next[0])  # the exact next batches
  np.testing.assert_array_equal(np.asarray(next(fresh)), expected_next[1])
  reopened.close()


def test_keeps_the_latest_n_and_saves_on_the_interval(tmp_path):
  checkpoints = Checkpoints(tmp_path, save_every=2, keep=2, async_save=False)
  saved = [checkpoints.save(step, make_state(step)) for step in range(1, 8)]
  assert saved == [False, True, False, True, False, True, False]
  assert checkpoints.save(7, make_state(7), force=True)
  checkpoints.close()
  assert Checkpoints(tmp_path).all_steps() == [6, 7]


def test_nothing_to_resume(tmp_path):
  checkpoints = Checkpoints(tmp_path / "new")
  assert checkpoints.latest_step is None and checkpoints.restore_latest(abstract_like(make_state(0))) is None
  checkpoints.close()


def test_an_unfinished_save_is_ignored(tmp_path):
  checkpoints = Checkpoints(tmp_path, save_every=1, async_save=False)
  checkpoints.save(1, make_state(1))
  checkpoints.close()
  (tmp_path / "2.orbax-checkpoint-tmp-1234").mkdir()  # what a save killed half-way leaves
  reopened = Checkpoints(tmp_path)
  assert reopened.latest_step == 1
  restored = reopened.restore_latest(abstract_like(make_state(0)))
  assert int(restored["step"]) == 1
  reopened.close()


@pytest.mark.parametrize("kwargs, match", [({"save_every": 0}, "save_every must be an int >= 1"),
                                           ({"keep": 0}, "keep must be an int >= 1")])
def test_bad_settings(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    Checkpoints(tmp_path, **kwargs)


# --- integrity: orbax restores a flipped byte silently; the step's checksums.sha256 does not ----

def _saved(tmp_path, steps=(1, 2)):
  checkpoints = Checkpoints(tmp_path, save_every=1, keep=3)
  for step in steps:
    checkpoints.save(step, make_state(step))
  checkpoints.close()
  return tmp_path


def _largest_array_file(folder):  # an OCDBT data file (array bytes), not orbax's metadata
  return max((p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def test_every_complete_step_is_sealed_with_a_manifest(tmp_path):
  from dalle_flax.file_checks import read_checksums, sha256_file
  _saved(tmp_path)
  for step in (1, 2):
    folder = tmp_path / str(step)
    listed = read_checksums(folder / "checksums.sha256")
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "checksums.sha256")
    assert sorted(listed) == files and any(name.startswith("state/") for name in files)
    assert all(listed[name] == sha256_file(folder / name) for name in files)


def test_a_flipped_byte_in_a_checkpoint_is_reported_and_the_opt_out_restores(tmp_path):
  _saved(tmp_path)
  victim = _largest_array_file(tmp_path / "2")
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  checkpoints = Checkpoints(tmp_path)
  with pytest.raises(OSError, match=rf"(?s){victim.name}' is damaged: its sha256.*Restore an earlier step"):
    checkpoints.restore_latest(abstract_like(make_state(0)))
  jax.tree.map(np.testing.assert_array_equal, checkpoints.restore(1, abstract_like(make_state(0))), make_state(1))
  checkpoints.close()
  unchecked = Checkpoints(tmp_path, verify=False)
  try:  # without the check only orbax's own structure checks remain (a data byte may pass them)
    unchecked.restore(2, abstract_like(make_state(0)))
  except Exception as e:  # noqa: BLE001 - whatever orbax says, it is not our check
    assert "is damaged" not in str(e)
  unchecked.close()


def test_a_step_killed_before_sealing_restores_unchecked_and_a_missing_file_is_named(tmp_path):
  _saved(tmp_path)
  (tmp_path / "2" / "checksums.sha256").unlink()
  checkpoints = Checkpoints(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, checkpoints.restore_latest(abstract_like(make_state(0))), make_state(2))
  victim = _largest_array_file(tmp_path / "1")
  victim.unlink()
  with pytest.raises(OSError, match=r"lacks 1 file\(s\) its checksums.sha256 lists"):
    checkpoints.restore(1, abstract_like(make_state(0)))
  checkpoints.close()
