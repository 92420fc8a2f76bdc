"""dalle-flax: DALL·E mini / mega text-to-image for JAX/Flax and the Hugging Face ecosystem.

Example::

    from dalle_flax import pipeline
    pipe = pipeline("text-to-image", model="path/to/dalle-mini-folder")
    images = pipe("an armchair in the shape of an avocado", seed=0)

Importing the package registers the config, tokenizer and processor classes with
transformers' ``Auto*`` factories and the "text-to-image" pipeline task. Registration is
idempotent and does no heavy work (no model is built, nothing is downloaded).
"""

__version__ = "0.1.0.dev0"

__all__ = [
    "DalleBartConfig",
    "DalleBartTokenizer",
    "DalleMiniConfig",
    "DalleMiniPipelineModel",
    "DalleMiniProcessor",
    "DecoderCache",
    "FlaxDalleMiniForConditionalGeneration",
    "FlaxVQGANModel",
    "TextNormalizer",
    "TextToImagePipeline",
    "TextToImagePipelineOutput",
    "VQGANConfig",
    "from_pil",
    "make_image_grid",
    "pipeline",
    "rerank_with_clip",
    "to_pil",
    "to_uint8",
]

# --- core model (configuration_dalle_mini, modeling_flax_dalle_mini) ---
from .configuration_dalle_mini import DalleBartConfig
from .configuration_dalle_mini import register as _register_dallebart_config
from .modeling_flax_dalle_mini import DecoderCache, FlaxDalleMiniForConditionalGeneration

_register_dallebart_config()

# --- vqgan (configuration_vqgan, modeling_flax_vqgan) ---
from .configuration_vqgan import VQGANConfig
from .configuration_vqgan import register as _register_vqgan_config
from .image_utils import from_pil, make_image_grid, to_pil, to_uint8
from .modeling_flax_vqgan import FlaxVQGANModel

_register_vqgan_config()

# --- text (text_normalization, tokenization_dalle_mini, processing_dalle_mini) ---
from .processing_dalle_mini import DalleMiniProcessor
from .processing_dalle_mini import register as _register_text_classes
from .text_normalization import TextNormalizer
from .tokenization_dalle_mini import DalleBartTokenizer

_register_text_classes()

# --- generation ---

# --- pipeline ---
from .pipelines import (
    DalleMiniConfig,
    DalleMiniPipelineModel,
    TextToImagePipeline,
    TextToImagePipelineOutput,
    pipeline,
    rerank_with_clip,
)
from .pipelines import register as _register_pipeline

_register_pipeline()
