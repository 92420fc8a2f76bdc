"""Generation for DALL·E mini: GenerationConfig resolution, sampling and the jitted loop.

Example: ``out = model.generate(input_ids, attention_mask, guidance_scale=10.0, seed=0)``.
"""

from .configuration import GENERATION_CONFIG_NAME, default_generation_config, resolve_generation_config
from .loop import LoopSpec, SampleState, run_steps
from .sampling import SamplingKnobs, apply_guidance, greedy_token, sample_token, top_p_mask
from .utils import DalleMiniGenerateOutput, GenerationMixin

__all__ = [
    "GENERATION_CONFIG_NAME",
    "DalleMiniGenerateOutput",
    "GenerationMixin",
    "LoopSpec",
    "SampleState",
    "SamplingKnobs",
    "apply_guidance",
    "default_generation_config",
    "greedy_token",
    "resolve_generation_config",
    "run_steps",
    "sample_token",
    "top_p_mask",
]
