"""A model, a pipeline and their parameters are freed when the user drops them, after they ran
(jit caches must not hold them: a server swapping 10 GB checkpoints would leak)."""

import gc
import weakref
from pathlib import Path

import jax
import numpy as np

from dalle_flax import pipeline

from test_generation_loop import padded_prompts, tiny_dallebart

TINY_PIPELINE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"


def _dropped(make_refs):
  """Runs ``make_refs()`` (which uses and then drops the objects), collects, returns the refs still alive."""
  refs = make_refs()
  gc.collect()
  return [name for name, ref in refs.items() if ref() is not None]


def test_model_and_params_freed_after_generate():
  def run():
    model = tiny_dallebart(use_scan=True)  # the scanned model's decoding view is a copy too
    ids, mask = padded_prompts([5, 9], 40)
    model.generate(ids, mask, seed=0, guidance_scale=3.0)
    model.generate(ids, mask, seed=1, callback=lambda step, tokens: None, callback_steps=4)
    model.generate(ids, mask, do_sample=False, trace=False)
    return {"model": weakref.ref(model), "param": weakref.ref(jax.tree.leaves(model.params)[0])}

  assert _dropped(run) == []


def test_pipeline_and_params_freed_after_a_call():
  def run():
    pipe = pipeline("text-to-image", model=str(TINY_PIPELINE))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red apple", "a blue car"], seed=0, guidance_scale=3.0, output_type="np")
    assert np.asarray(images).shape[:2] == (2, 1)
    pipe("a fox", seed=1, callback_on_step_end=lambda p, step, kwargs: None, callback_steps=8)
    return {"pipeline": weakref.ref(pipe), "text_model": weakref.ref(pipe.model.text_model),
            "vqgan": weakref.ref(pipe.model.vqgan),
            "text_param": weakref.ref(jax.tree.leaves(pipe.model.text_model.params)[0]),
            "vqgan_param": weakref.ref(jax.tree.leaves(pipe.model.vqgan.params)[0])}

  assert _dropped(run) == []
