"""Training checkpoints: the train state and the data iterator, saved atomically with orbax.

Example::

    checkpoints = Checkpoints(output_dir / "checkpoints", save_every=500, keep=3)
    state = checkpoints.restore_latest(abstract_state, iterator) or state  # resume if possible
    checkpoints.save(step, state, iterator)
    checkpoints.close()                                  # waits for the last async save

A checkpoint at step ``s`` holds the state after ``s`` updates and the data iterator positioned
at the first batch of update ``s + 1``, so a resumed run continues with exactly the batches
and random keys the uninterrupted run would have used. Orbax writes each checkpoint into a
temporary folder and renames it when complete; a folder left by a killed save is never
restored (``latest_step`` ignores it) and is cleaned up on the next start.

Orbax checks a checkpoint's structure, not its bytes (a flipped byte in an array file restores
silently with wrong values), so each complete step folder gets a ``checksums.sha256`` of every
file in it (written by process 0 when the next save starts, or at :meth:`Checkpoints.close`), and
:meth:`Checkpoints.restore` checks it first: a damaged file is an OSError naming it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from ..file_checks import CHECKSUMS_NAME, read_checksums, verify_checksums, write_checksums

logger = logging.getLogger(__name__)

__all__ = ["Checkpoints"]

_STATE, _DATA = "state", "data"


class Checkpoints:
  """An orbax ``CheckpointManager`` over (train state, grain iterator) pairs.

  Args:
    directory: where the step folders go (created if needed).
    save_every: save only steps that are multiples of this (``save(..., force=True)`` saves any).
    keep: how many of the latest checkpoints to keep (older ones are deleted).
    async_save: write in the background while training continues (``close`` waits).
    verify: check a step folder's ``checksums.sha256`` before restoring it (False: skip the
      hashing, about 1 s per GB); the manifests are written either way.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 500, keep: int = 3,
               async_save: bool = True, verify: bool = True):
    for name, value in (("save_every", save_every), ("keep", keep)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    self.directory = Path(directory).absolute()
    self.save_every = save_every
    self.verify = verify
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  @property
  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints kept, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator | None = None, *,
           force: bool = False) -> bool:
    """Saves ``state`` (any pytree of arrays) and the iterator's position after ``step`` updates.

    Returns:
      Whether a checkpoint was started (False when ``step`` is not a multiple of ``save_every``).
    """
    if not force and step % self.save_every:
      return False
    self._seal_completed()
    items = {_STATE: ocp.args.StandardSave(state)}
    if iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(iterator)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the state saved at ``step`` (and moves ``iterator`` to its saved position).

    Args:
      step: a step of :meth:`all_steps`.
      abstract_state: the state's structure, shapes, dtypes and shardings (``jax.eval_shape``
        of the init function, with ``.sharding`` set on each leaf), so every array is restored
        straight onto its devices.
      iterator: the data iterator to reposition (built from the same data and settings).

    Returns:
      The restored state.
    """
    if self.verify:
      self.verify_step(step)
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(iterator)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    logger.info("Restored step %d from %s", step, self.directory)
    return restored[_STATE]

  def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator | None = None) -> Any | None:
    """:meth:`restore` of the newest checkpoint, or None when there is none."""
    step = self.latest_step
    return None if step is None else self.restore(step, abstract_state, iterator)

  def step_directory(self, step: int) -> Path:
    """The folder of the complete checkpoint at ``step``."""
    return Path(self._manager.directory) / str(int(step))

  def verify_step(self, step: int) -> None:
    """Checks every file of step ``step`` against its ``checksums.sha256`` (none yet: unchecked).

    Raises:
      OSError: a file's bytes differ from the manifest's hash (naming the file), or a listed
        file is missing.
    """
    folder = self.step_directory(step)
    manifest = folder / CHECKSUMS_NAME
    if not manifest.is_file():
      logger.info("Checkpoint %s has no %s yet (killed before it was sealed); restoring unchecked",
                  folder, CHECKSUMS_NAME)
      return
    listed = read_checksums(manifest)
    missing = sorted(name for name in listed if not (folder / name).is_file())
    if missing:
      raise OSError(f"The checkpoint {str(folder)!r} lacks {len(missing)} file(s) its {CHECKSUMS_NAME} lists: "
                    f"{missing[:5]}. Restore an earlier step (delete this folder) or start again.")
    verify_checksums(manifest, {name: folder / name for name in listed},
                     fix=f"Restore an earlier step (delete the folder {str(folder)!r} to resume from the one "
                         "before), or pass verify=False to restore it unchecked.")

  def _seal_completed(self) -> None:
    """Writes the manifest of every complete step folder that has none (process 0 only)."""
    self._manager.wait_until_finished()
    if jax.process_index() != 0:
      return
    for step in self.all_steps():
      folder = self.step_directory(step)
      if folder.is_dir() and not (folder / CHECKSUMS_NAME).is_file():
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != CHECKSUMS_NAME)
        write_checksums(folder, names)

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk (and writes its manifest)."""
    self._seal_completed()

  def close(self) -> None:
    """Waits for pending saves, writes their manifests and releases the manager."""
    self._seal_completed()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``state``, for :meth:`Checkpoints.restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
