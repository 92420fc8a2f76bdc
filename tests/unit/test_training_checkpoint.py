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
