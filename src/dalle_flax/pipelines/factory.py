"""``dalle_flax.pipeline(...)``: transformers' ``pipeline(...)`` call shape, without torch.

Example: ``pipe = dalle_flax.pipeline("text-to-image", model="dalle-mini/dalle-mini")``.

``transformers.pipeline("text-to-image", model=<repo id or folder>)`` needs torch (its loader
does); this factory builds the same :class:`TextToImagePipeline` with JAX only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..bundled import BUNDLED_MODEL, bundled_model
from .text_to_image import TextToImagePipeline

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "SUPPORTED_TASKS", "pipeline"]

SUPPORTED_TASKS = {"text-to-image": TextToImagePipeline}
DEFAULT_MODEL = (str(BUNDLED_MODEL), None)
"""(model, revision) used when no model is given, here and in transformers' factory: the bundled
shapes pipeline folder (offline; a local folder has no revision)."""


def pipeline(
    task: str = "text-to-image",
    model: Any = None,
    *,
    vqgan: Any = None,
    revision: str | None = None,
    dtype: Any = None,
    device: Any = None,
    **kwargs: Any,
) -> TextToImagePipeline:
  """Builds a pipeline for ``task`` from a folder, a Hub repo id or loaded models.

  Args:
    task: "text-to-image".
    model: a single-folder pipeline or a text model (folder or repo id), a
      ``DalleMiniPipelineModel``, or a ``FlaxDalleMiniForConditionalGeneration`` (then pass
      ``vqgan`` and ``processor`` / ``tokenizer``). None: :data:`DEFAULT_MODEL`, the bundled shapes model
      (:mod:`dalle_flax.bundled`, offline), with a warning, as transformers' ``pipeline`` does.
    vqgan: the VQGAN (repo id, folder or ``FlaxVQGANModel``); needed for text-only repos that
      are not one of the released DALL·E mini models.
    revision: branch, tag or commit of ``model``.
    dtype: computation dtype of the text model ("float32", "bfloat16", "float16").
    device: where to put the parameters (see :class:`TextToImagePipeline`).
    **kwargs: loading keywords (``vqgan_revision``, ``processor``, ``cache_dir``, ``token``,
      ``local_files_only``, ``force_download``) and pipeline keywords (``batch_size``, defaults
      for the call such as ``guidance_scale``).

  Returns:
    The pipeline.

  Raises:
    KeyError: an unknown task.
  """
  if task not in SUPPORTED_TASKS:
    raise KeyError(f"Unknown task {task!r}; dalle_flax supports {sorted(SUPPORTED_TASKS)}.")
  if model is None:
    model, default_revision = DEFAULT_MODEL
    revision = revision or default_revision
    bundled_model()  # a clear error when this installation lacks it
    logger.warning("No model was supplied, defaulted to the bundled shapes model %s; pass model= (a "
                   "pipeline folder or repo id, e.g. dalle-mini/dalle-mini) to choose.", model)
  pipeline_class = SUPPORTED_TASKS[task]
  if isinstance(model, (str, os.PathLike)):
    return pipeline_class.from_pretrained(model, vqgan=vqgan, revision=revision, dtype=dtype,
                                          device=device, task=task, **kwargs)
  if revision is not None:
    raise ValueError("revision= only applies when model is a folder or repo id; the model is "
                     "already loaded.")
  return pipeline_class(model, vqgan=vqgan, dtype=dtype, device=device, task=task, **kwargs)
