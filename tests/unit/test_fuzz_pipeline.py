"""Fuzzing the pipeline's arguments (and through it ``generate()``'s knobs) on the tiny model.

Each knob is drawn from a few valid values (kept to shapes compiled once, so valid calls stay
cheap) or from values that are clearly wrong (wrong types, NaN, negative, out of range). A call
with any wrong knob must raise a ValueError or TypeError whose message names one of the wrong
knobs; a call with only valid knobs must return the images asked for. Seeded
(``derandomize=True``): 1,000 calls by default and 9,000 more under ``slow``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fuzzing import DEFAULT_EXAMPLES, SLOW_EXAMPLES, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

import dalle_flax

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
NAN, INF = math.nan, math.inf

# knob: (valid values, wrong values)
KNOBS = {
    "num_images_per_prompt": ([None, 1, 2], [0, -1, 1.5, "2", [1]]),
    "guidance_scale": ([None, 1.0, 3.0], [NAN, INF, "3", [3.0]]),
    "temperature": ([None, 0.5, 1.0], [NAN, -1.0, "1", INF]),
    "top_k": ([None, 4, 64], [-1, 1.5, "4"]),  # past the vocabulary: all tokens, as in transformers
    "top_p": ([None, 0.9, 1.0], [1.5, -0.1, NAN, "0.9"]),
    "seed": ([None, 0, 7, 2**32 - 1], [-1, 2**32, 1.5, "7"]),
    "output_type": ([None, "pil", "np", "tokens"], ["jpg", 3]),
}
PROMPTS = (["a red circle", ["a red circle"]], [5, None, [], [1], ["ok", 2]])


@st.composite
def _calls(draw):
  wrong, kwargs = set(), {}
  for name, (good, bad) in {"prompt": PROMPTS, **KNOBS}.items():
    if draw(st.integers(0, 9)) == 0:
      kwargs[name] = draw(st.sampled_from(bad))
      wrong.add(name)
    else:
      kwargs[name] = draw(st.sampled_from(good))
  return kwargs, wrong


@pytest.fixture(scope="module")
def pipe(jax_cache):
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _check_call(pipe, kwargs: dict, wrong: set) -> None:
  prompt = kwargs.pop("prompt")
  try:
    out = pipe(prompt, return_dict=True, **{k: v for k, v in kwargs.items() if v is not None})
  except (ValueError, TypeError) as e:
    assert wrong, f"a valid call was refused: {kwargs} {prompt!r}: {e}"
    assert any(name in str(e) for name in wrong), f"the error does not name any of {sorted(wrong)}: {e}"
  else:
    assert not wrong, f"wrong knobs {sorted(wrong)} were accepted: {kwargs} {prompt!r}"
    n = kwargs["num_images_per_prompt"] or 1
    images = out.images[0] if isinstance(prompt, list) else out.images
    assert len(images) == n
    assert len(np.asarray(out.seeds).reshape(-1)) == n
    if kwargs["seed"] is not None:
      assert int(np.asarray(out.seeds).reshape(-1)[0]) == kwargs["seed"]


def _fuzz(pipe, examples: int) -> None:
  @fuzz_settings(examples, HealthCheck.function_scoped_fixture)
  @given(_calls())
  def run(call):
    kwargs, wrong = call
    _check_call(pipe, dict(kwargs), wrong)

  run()


def test_fuzz_pipeline_arguments(pipe):
  _fuzz(pipe, DEFAULT_EXAMPLES)


@pytest.mark.slow
def test_fuzz_pipeline_arguments_slow(pipe):
  _fuzz(pipe, SLOW_EXAMPLES)
