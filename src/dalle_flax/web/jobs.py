"""The demo's generation queue: one generation at a time on one worker thread, a bounded wait line.

Example::

    queue = GenerationQueue({"shapes": pipe}, max_queue=8)
    job = queue.submit("shapes", {"prompt": "a red circle", "num_images_per_prompt": 2},
                       on_event=lambda name, payload: print(name, payload))
    job.wait()          # or job.cancel() when the client goes away
    queue.close()

A job reports, through ``on_event(name, payload)`` (called from the worker thread or from
``submit``; it must not block):

- ``queued``: ``{"position", "eta_s"}`` when it enters the line and whenever it moves up
  (position 1: next to run; ``eta_s`` None until a generation has been timed);
- ``progress``: ``{"step", "total", "images"}`` at the start (step 0) and every
  ``progress_every`` image tokens (``step`` counts the tokens of all the job's images;
  ``images`` are the partial images, gray where no token is sampled yet, PIL);
- ``done``: ``{"images" (PIL), "seeds", "elapsed_s", "model"}``;
- ``error``: ``{"error"}`` (the generation raised; the worker goes on with the next job).

A cancelled job leaves the line at once, or stops at its next progress point when it is running
(the pipeline's step callback raises); it then reports nothing more.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["Cancelled", "GenerationQueue", "Job", "QueueFull"]

PREVIEW_GRAY = (128, 128, 128)
"""The colour of an image before its first token (the pipeline's preview paints unsampled areas so)."""
EventSink = Callable[[str, dict[str, Any]], Any]


class QueueFull(RuntimeError):
  """``submit`` found ``max_queue`` jobs already waiting; ``retry_after`` is a hint in seconds."""

  def __init__(self, message: str, retry_after: int):
    super().__init__(message)
    self.retry_after = retry_after


class Cancelled(Exception):
  """Raised inside a running job's step callback once the job is cancelled."""


class Job:
  """One generation request in the queue (made by :meth:`GenerationQueue.submit`)."""

  def __init__(self, job_id: int, model: str, kwargs: dict[str, Any], on_event: EventSink, progress_every: int):
    self.id, self.model, self.kwargs, self.on_event = job_id, model, kwargs, on_event
    self.progress_every = progress_every
    self.num_images = int(kwargs.get("num_images_per_prompt") or 1)
    self.state = "queued"  # -> running -> done | error | cancelled
    self.result: dict[str, Any] | None = None
    self.error: BaseException | None = None
    self._cancelled = threading.Event()
    self._finished = threading.Event()
    self._on_cancel: Callable[[], Any] | None = None  # the queue drops a waiting job at once

  @property
  def cancelled(self) -> bool:
    return self._cancelled.is_set()

  def cancel(self) -> None:
    """Stops the job: a waiting one leaves the line, a running one stops at its next progress point."""
    self._cancelled.set()
    if self._on_cancel is not None:
      self._on_cancel()

  def wait(self, timeout: float | None = None) -> bool:
    """Blocks until the job is done, failed or cancelled; False on timeout."""
    return self._finished.wait(timeout)

  def _emit(self, name: str, payload: dict[str, Any]) -> None:
    if self.cancelled:
      return
    try:
      self.on_event(name, payload)
    except Exception:  # noqa: BLE001 (a sink that fails must not kill the worker)
      logger.exception("the event sink of job %d failed on %r", self.id, name)

  def __repr__(self) -> str:
    return f"Job(id={self.id}, model={self.model!r}, state={self.state!r}, images={self.num_images})"


class GenerationQueue:
  """Runs jobs one at a time, in order, on a worker thread; at most ``max_queue`` wait.

  Args:
    pipes: model name -> loaded text-to-image pipeline.
    max_queue: the most jobs waiting behind the running one; more get :class:`QueueFull`.
    progress_every: image tokens between progress events (and cancellation points) by default.
  """

  def __init__(self, pipes: Mapping[str, Any], *, max_queue: int = 8, progress_every: int = 16):
    if not pipes:
      raise ValueError("GenerationQueue needs at least one pipeline, got none")
    if max_queue < 0:
      raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if progress_every < 1:
      raise ValueError(f"progress_every must be >= 1, got {progress_every}")
    self.pipes = dict(pipes)
    self.max_queue, self.progress_every = max_queue, progress_every
    self._waiting: collections.deque[Job] = collections.deque()
    self._running: Job | None = None
    self._running_since = 0.0
    self._seconds_per_image: dict[str, float] = {}  # moving average per model, from finished jobs
    self._ids = itertools.count(1)
    self._lock = threading.Condition()
    self._closed = False
    self._worker = threading.Thread(target=self._work, name="dalle-flax-generation", daemon=True)
    self._worker.start()

  # --- what the server asks --------------------------------------------------------------------
  def submit(self, model: str, kwargs: dict[str, Any], on_event: EventSink, *,
             progress_every: int | None = None) -> Job:
    """Queues a generation of ``self.pipes[model](**kwargs)``; raises QueueFull when the line is full."""
    if model not in self.pipes:
      raise KeyError(f"model {model!r} is not served; expected one of {sorted(self.pipes)}")
    with self._lock:
      if self._closed:
        raise RuntimeError("the generation queue is closed")
      self._drop_cancelled()
      if len(self._waiting) >= self.max_queue and (self._running is not None or self._waiting):
        raise QueueFull(f"the queue is full: {len(self._waiting)} request(s) waiting (--max-queue "
                        f"{self.max_queue}); try again later", retry_after=self._retry_after())
      job = Job(next(self._ids), model, dict(kwargs), on_event, progress_every or self.progress_every)
      job._on_cancel = self._dropper
      self._waiting.append(job)
      position, eta = len(self._waiting), self._eta(len(self._waiting) - 1)
      self._lock.notify_all()
    job._emit("queued", {"position": position, "eta_s": eta})
    return job

  def status(self) -> dict[str, Any]:
    """``{"running", "waiting", "max_queue"}``: what /health shows."""
    with self._lock:
      self._drop_cancelled()
      return {"running": self._running is not None, "waiting": len(self._waiting), "max_queue": self.max_queue}

  def close(self, timeout: float = 30.0) -> None:
    """Cancels every job and stops the worker (waits up to ``timeout`` s for a running one)."""
    with self._lock:
      self._closed = True
      for job in (*self._waiting, *([self._running] if self._running else [])):
        job.cancel()
      self._lock.notify_all()
    self._worker.join(timeout)

  # --- estimates (under the lock) ---------------------------------------------------------------
  def _job_seconds(self, job: Job) -> float | None:
    per_image = self._seconds_per_image.get(job.model)
    return None if per_image is None else per_image * job.num_images

  def _eta(self, ahead: int) -> float | None:
    """Seconds until the job at index ``ahead`` of the line has finished (None: no timing yet)."""
    total = 0.0
    if self._running is not None:
      running = self._job_seconds(self._running)
      if running is None:
        return None
      total += max(running - (time.perf_counter() - self._running_since), 0.0)
    for job in itertools.islice(self._waiting, ahead + 1):
      seconds = self._job_seconds(job)
      if seconds is None:
        return None
      total += seconds
    return round(total, 1)

  def _retry_after(self) -> int:
    eta = self._eta(0) if self._waiting else None
    return max(1, math.ceil(eta)) if eta is not None else 10

  def _dropper(self) -> None:
    with self._lock:
      self._drop_cancelled()

  def _drop_cancelled(self) -> None:
    kept = [job for job in self._waiting if not job.cancelled]
    for job in self._waiting:
      if job.cancelled:
        job.state = "cancelled"
        job._finished.set()
    self._waiting = collections.deque(kept)

  # --- the worker ---------------------------------------------------------------------------------
  def _work(self) -> None:
    while True:
      with self._lock:
        while not self._closed:
          self._drop_cancelled()
          if self._waiting:
            break
          self._lock.wait()
        if self._closed:
          self._drop_cancelled()
          return
        job = self._waiting.popleft()
        self._running, self._running_since = job, time.perf_counter()
        job.state = "running"
        moved = [(waiting, i + 1, self._eta(i)) for i, waiting in enumerate(self._waiting)]
      for waiting, position, eta in moved:
        waiting._emit("queued", {"position": position, "eta_s": eta})
      try:
        self._run(job)
      finally:
        with self._lock:
          self._running = None
          job._finished.set()

  def _run(self, job: Job) -> None:
    pipe = self.pipes[job.model]
    kwargs = {key: value for key, value in job.kwargs.items() if key != "prompt"}
    num_images = job.num_images
    length = int(pipe.model.config.text_config.image_length)
    partial: list[Any] = [None] * num_images
    side = math.isqrt(length) * int(pipe.model.vqgan.config.downsample_factor)
    blank = [Image.new("RGB", (side, side), PREVIEW_GRAY) for _ in range(num_images)]

    def on_step(_pipe: Any, step: int, callback_kwargs: dict[str, Any]) -> None:
      if job.cancelled:
        raise Cancelled
      indices = callback_kwargs["image_indices"]
      for index, image in zip(indices, callback_kwargs["preview"]):
        partial[index] = image
      job._emit("progress", {"step": _tokens_done(indices, step, length), "total": num_images * length,
                             "images": [image if image is not None else blank[i] for i, image in enumerate(partial)]})

    job._emit("progress", {"step": 0, "total": num_images * length, "images": list(blank)})
    start = time.perf_counter()
    try:
      out = pipe(job.kwargs["prompt"], return_dict=True, callback_on_step_end=on_step,
                 callback_steps=min(job.progress_every, length), callback_on_step_end_tensor_inputs=("preview",),
                 **kwargs)
    except Cancelled:
      job.state = "cancelled"
      logger.info("job %d cancelled (its client left)", job.id)
      return
    except Exception as error:  # noqa: BLE001 (reported to the client; the worker lives on)
      logger.exception("job %d failed", job.id)
      job.state, job.error = "error", error
      job._emit("error", {"error": f"{type(error).__name__}: {error}"})
      return
    elapsed = time.perf_counter() - start
    with self._lock:
      previous = self._seconds_per_image.get(job.model)
      per_image = elapsed / num_images
      self._seconds_per_image[job.model] = per_image if previous is None else 0.5 * (previous + per_image)
    job.state = "done"
    job.result = {"images": list(out.images), "seeds": [int(s) for s in out.seeds],
                  "elapsed_s": round(elapsed, 3), "model": job.model}
    logger.info("job %d: %d image(s) in %.2f s (seeds %s)", job.id, num_images, elapsed, job.result["seeds"])
    job._emit("done", job.result)


def _tokens_done(indices: list[int], step: int, length: int) -> int:
  """Tokens sampled over all images: the images before this generate call are complete."""
  return indices[0] * length + step * len(indices)
