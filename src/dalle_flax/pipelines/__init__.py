"""Text-to-image pipelines: ``TextToImagePipeline``, its loader, config and output.

Example: ``images = dalle_flax.pipeline("text-to-image", model="path/to/pipeline")("a fox", seed=0)``.

:func:`register` (run by ``import dalle_flax``) registers ``DalleMiniConfig`` with ``AutoConfig``
and the "text-to-image" task with transformers' ``PIPELINE_REGISTRY``, with
:class:`DalleMiniPipelineModel` as the task's model class: that is what transformers' pipeline
factory calls ``from_pretrained`` on when given a repo id or folder.
"""

from __future__ import annotations

import logging

from ..generation.seeds import image_seeds
from .clip_rerank import rerank_with_clip
from .configuration import DalleMiniConfig
from .configuration import register as _register_config
from .factory import DEFAULT_MODEL, SUPPORTED_TASKS, pipeline
from .loading import KNOWN_VQGANS, DalleMiniPipelineModel
from .pipeline_output import TextToImagePipelineOutput
from .text_to_image import TextToImagePipeline, grid_shape

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_VQGANS",
    "SUPPORTED_TASKS",
    "DalleMiniConfig",
    "DalleMiniPipelineModel",
    "TextToImagePipeline",
    "TextToImagePipelineOutput",
    "grid_shape",
    "image_seeds",
    "pipeline",
    "register",
    "rerank_with_clip",
]

TASK = "text-to-image"


def register() -> None:
  """Registers the config with ``AutoConfig`` and the task with ``PIPELINE_REGISTRY``; idempotent."""
  from transformers.pipelines import PIPELINE_REGISTRY

  _register_config()
  current = PIPELINE_REGISTRY.supported_tasks.get(TASK)
  if current is not None and current.get("impl") is TextToImagePipeline:
    return
  PIPELINE_REGISTRY.register_pipeline(
      TASK, pipeline_class=TextToImagePipeline, pt_model=DalleMiniPipelineModel,
      default={"model": DEFAULT_MODEL}, type="multimodal")
