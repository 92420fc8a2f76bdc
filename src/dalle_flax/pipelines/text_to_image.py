"""``TextToImagePipeline``: prompts in, images out, as a ``transformers.Pipeline`` on JAX.

Example: ``images = TextToImagePipeline.from_pretrained("path/to/pipeline")("a red fox", seed=0)``.

The pipeline tokenizes the prompts, samples image tokens with the text model's ``generate``
(every prompt of a call, ``batch_size`` images per ``generate`` call), decodes them with the
VQGAN and returns PIL images. It subclasses ``transformers.Pipeline`` so
``transformers.pipeline("text-to-image", model=...)`` builds it, but overrides ``__init__``,
``__call__`` and ``forward`` (the base ones are torch-only): it runs without torch.

Seeds: every image has its own seed (see ``dalle_flax.generation.seeds``), so
``pipe(prompt, seed=out.seeds[i])`` regenerates image ``i`` alone, pixel for pixel.

Progress: a tqdm bar over image tokens (``pipe.set_progress_bar_config(disable=True)`` turns it
off), and ``callback_on_step_end(pipe, step, callback_kwargs)`` every ``callback_steps`` tokens,
where ``step`` is the number of tokens sampled so far and ``callback_kwargs`` holds
``"image_indices"`` (indices in the call of the m images of the current ``generate`` call),
``"image_tokens"`` ((m, step) int32 codes) and ``"preview"`` (m PIL images: the partial code map
decoded, the tokens not sampled yet painted gray). Its return value is ignored.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm
from transformers import Pipeline

from ..generation.seeds import flatten_seeds, image_keys
from ..image_utils import to_pil, to_uint8
from ..modeling_flax_dalle_mini import FlaxDalleMiniForConditionalGeneration
from ..processing_dalle_mini import DalleMiniProcessor
from .loading import DalleMiniPipelineModel, build_components
from .pipeline_output import TextToImagePipelineOutput

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_TYPES", "TextToImagePipeline", "grid_shape"]

OUTPUT_TYPES = ("pil", "np", "tokens")
_GRAY = 128  # fill of the not-yet-sampled tokens in previews
_PREPROCESS_KEYS = ("negative_prompt", "num_images_per_prompt")
_GENERATE_KEYS = ("guidance_scale", "condition_scale", "temperature", "top_k", "top_p",
                  "do_sample", "suppress_tokens")
_FORWARD_KEYS = (*_GENERATE_KEYS, "seed", "prng_key", "callback_on_step_end", "callback_steps",
                 "callback_on_step_end_tensor_inputs", "batch_size")
_POSTPROCESS_KEYS = ("output_type", "return_dict", "grid", "seamless")
_DEFAULTS = {"num_images_per_prompt": 1, "output_type": "pil", "return_dict": False,
             "callback_steps": 32, "grid": False, "seamless": False,
             "callback_on_step_end_tensor_inputs": ("image_tokens", "preview")}


def grid_shape(num_images: int) -> tuple[int, int]:
  """(rows, cols) of the squarest grid holding exactly ``num_images`` images (rows <= cols)."""
  rows = max(d for d in range(1, math.isqrt(num_images) + 1) if num_images % d == 0)
  return rows, num_images // rows


def _nest(items: Sequence[Any], num_prompts: int, single: bool) -> Any:
  """Flat prompt-major items -> a list per prompt, or the flat list for a single prompt."""
  if single:
    return list(items)
  size = len(items) // num_prompts
  return [list(items[p * size:(p + 1) * size]) for p in range(num_prompts)]


def _positive_int(name: str, value: Any, none_ok: bool = False) -> int | None:
  if value is None and none_ok:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int{' or None' if none_ok else ''}, got {value!r}.")
  return value


class TextToImagePipeline(Pipeline):
  """DALL·E mini / mega text-to-image pipeline (JAX).

  Args:
    model: a :class:`DalleMiniPipelineModel` (what ``from_pretrained`` loads), a
      ``FlaxDalleMiniForConditionalGeneration`` (then pass ``vqgan`` and ``processor`` or
      ``tokenizer``), or a folder / repo id to load.
    processor: replaces the model's processor (a ``DalleMiniProcessor``).
    tokenizer: a ``DalleBartTokenizer`` to build the processor from, when ``model`` is a text
      model and no processor is given.
    vqgan: replaces the model's VQGAN (a ``FlaxVQGANModel``, a folder or a repo id).
    task: the registered task name.
    device: a jax device, an index into ``jax.devices()``, or a platform name ("cpu", "gpu",
      "cuda:1"); parameters are moved there. None keeps them where they are.
    dtype: computation dtype when ``model`` is a path (transformers passes the one it used).
    batch_size: the most images per ``generate`` call (None: all images of a call at once).
    **kwargs: defaults for ``__call__`` arguments (e.g. ``guidance_scale=10.0``).
  """

  _load_processor = False
  _load_image_processor = False
  _load_feature_extractor = False
  _load_tokenizer = False
  _load_video_processor = False

  def __init__(
      self,
      model: DalleMiniPipelineModel | FlaxDalleMiniForConditionalGeneration | str | os.PathLike,
      processor: DalleMiniProcessor | None = None,
      tokenizer: Any = None,
      vqgan: Any = None,
      *,
      task: str = "text-to-image",
      device: Any = None,
      dtype: Any = None,
      batch_size: int | None = None,
      **kwargs: Any,
  ):
    # No super().__init__(): it places a torch model on a torch device.
    kwargs.pop("binary_output", None)
    self._num_workers = kwargs.pop("num_workers", None)
    self.model = build_components(model, processor=processor, tokenizer=tokenizer, vqgan=vqgan,
                                  dtype=dtype)
    self.task = task
    self.processor = self.model.processor
    self.tokenizer = self.processor.tokenizer
    self.feature_extractor = self.image_processor = self.video_processor = None
    self.binary_output = False
    self.call_count = 0
    self.device = self._place(device)
    self._batch_size = _positive_int("batch_size", batch_size, none_ok=True)
    self._progress_bar_config: dict[str, Any] = {}
    defaults = self._sanitize_parameters(**kwargs)
    self._preprocess_params, self._forward_params, self._postprocess_params = defaults

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
                      ) -> TextToImagePipeline:
    """Loads the components (see :meth:`DalleMiniPipelineModel.from_pretrained` for the loading
    keywords) and builds the pipeline; other keywords go to the constructor."""
    load_keys = ("vqgan", "vqgan_revision", "processor", "revision", "cache_dir", "token",
                 "local_files_only", "force_download", "dtype")
    load_kwargs = {k: kwargs.pop(k) for k in load_keys if k in kwargs}
    return cls(DalleMiniPipelineModel.from_pretrained(pretrained_model_name_or_path, **load_kwargs),
               **kwargs)

  def _place(self, device: Any) -> jax.Device:
    if device is None:
      leaves = jax.tree.leaves(self.model.text_model.params)
      devices = leaves[0].devices() if leaves and hasattr(leaves[0], "devices") else set()
      return next(iter(devices)) if len(devices) == 1 else jax.devices()[0]
    if isinstance(device, jax.Device):
      target = device
    elif isinstance(device, (int, np.integer)) and not isinstance(device, bool):
      target = jax.devices()[int(device)] if device >= 0 else jax.devices("cpu")[0]
    else:  # "cpu", "gpu", "cuda", "cuda:1", "tpu", or a torch.device
      platform, _, index = str(device).partition(":")
      platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
      try:
        target = jax.devices(platform)[int(index or 0)]
      except (RuntimeError, IndexError, ValueError) as e:
        raise ValueError(f"device {device!r} is not available to jax ({e}); jax sees "
                         f"{jax.devices()}.") from None
    for component in (self.model.text_model, self.model.vqgan):
      component.params = jax.device_put(component.params, target)
    return target

  def __repr__(self) -> str:
    return f"{type(self).__name__}(model={self.model!r}, device={self.device})"

  @property
  def dtype(self) -> Any:
    return self.model.dtype

  @property
  def _image_length(self) -> int:
    return self.model.config.text_config.image_length

  # --- progress ----------------------------------------------------------------------------------
  def set_progress_bar_config(self, **kwargs: Any) -> None:
    """Stores tqdm keyword arguments for the progress bar (``disable=True`` turns it off)."""
    self._progress_bar_config = dict(kwargs)

  def progress_bar(self, total: int) -> tqdm:
    """A tqdm bar over ``total`` image tokens, configured by :meth:`set_progress_bar_config`."""
    return tqdm(total=total, **{"desc": "Generating image tokens", "unit": "tok",
                                **self._progress_bar_config})

  # --- transformers.Pipeline steps -----------------------------------------------------------------
  def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict[str, Any], ...]:
    known = (*_PREPROCESS_KEYS, *_FORWARD_KEYS, *_POSTPROCESS_KEYS)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
      raise TypeError(f"{type(self).__name__} got unknown argument(s) {unknown}; accepted: "
                      f"{sorted(known)}.")
    return tuple({k: kwargs[k] for k in keys if kwargs.get(k) is not None}
                 for keys in (_PREPROCESS_KEYS, _FORWARD_KEYS, _POSTPROCESS_KEYS))

  def preprocess(self, prompts: list[str], negative_prompt: str | list[str] | None = None,
                 num_images_per_prompt: int = 1) -> dict[str, np.ndarray]:
    """Tokenizes prompts and negative prompts; one row per image (prompt-major).

    Returns:
      ``input_ids``, ``attention_mask``, ``negative_prompt_ids``,
      ``negative_prompt_attention_mask``: int32, each (b * n, max_text_length).
    """
    batch = self.processor(prompts, negative_prompt=negative_prompt)
    names = ("input_ids", "attention_mask", "negative_prompt_ids", "negative_prompt_attention_mask")
    return {name: np.repeat(np.asarray(batch[name]), num_images_per_prompt, axis=0) for name in names}

  def forward(self, model_inputs: dict[str, Any], **forward_params: Any) -> dict[str, np.ndarray]:
    return self._forward(model_inputs, **forward_params)

  def _forward(self, model_inputs: dict[str, Any], **forward_params: Any) -> dict[str, np.ndarray]:
    """Samples the image tokens of one batch of m images.

    Args:
      model_inputs: the arrays of :meth:`preprocess` for m images, plus ``seeds`` (m ints) or
        ``prng_keys`` ((m,) keys).
      **forward_params: ``generate`` keywords (``guidance_scale``, ``temperature``, ``top_k``,
        ``top_p``, ``callback``, ``callback_steps``...).

    Returns:
      ``{"image_tokens": (m, image_length) int32}``.
    """
    output = self.model.text_model.generate(
        model_inputs["input_ids"],
        model_inputs["attention_mask"],
        negative_prompt_ids=model_inputs["negative_prompt_ids"],
        negative_prompt_attention_mask=model_inputs["negative_prompt_attention_mask"],
        seed=model_inputs.get("seeds"),
        prng_key=model_inputs.get("prng_keys"),
        **forward_params,
    )
    return {"image_tokens": np.asarray(output.image_tokens, np.int32)}

  def decode_image_tokens(self, image_tokens: np.ndarray, *, grid: tuple[int, int] | None = None,
                          seamless: bool = False) -> np.ndarray:
    """Decodes codes to float32 images in [0, 1].

    Images are decoded one at a time: a batched decode rounds differently in the last bits, and
    an image regenerated alone from its seed must equal the one made in a batch, pixel for
    pixel (one compiled shape, too; the VQGAN is cheap next to sampling the tokens).

    Args:
      image_tokens: (m, image_length) codes; with ``grid=(rows, cols)`` m is a multiple of
        rows * cols and each group of rows * cols codes becomes one image.
      grid: tile each group into one image, in the order of ``image_utils.make_image_grid``.
      seamless: with ``grid``, decode the tiled code map at once so tile borders blend
        (min-dalle's seamless mode) instead of decoding each image and pasting them.

    Returns:
      (m, H, W, 3), or (m / (rows * cols), rows * H, cols * W, 3) with ``grid``.
    """
    vqgan = self.model.vqgan
    if grid is not None and seamless:
      group = grid[0] * grid[1]
      pixels = [vqgan.decode_seamless(image_tokens[i:i + group], *grid)
                for i in range(0, len(image_tokens), group)]
    else:
      pixels = [vqgan.decode_code(image_tokens[i:i + 1]) for i in range(len(image_tokens))]
    images = np.clip(np.concatenate([np.asarray(p, np.float32) for p in pixels]), 0.0, 1.0)
    if grid is not None and not seamless:
      (rows, cols), (m, h, w, c) = grid, images.shape
      images = (images.reshape(m // (rows * cols), rows, cols, h, w, c).transpose(0, 1, 3, 2, 4, 5)
                .reshape(m // (rows * cols), rows * h, cols * w, c))
    return images

  def postprocess(self, model_outputs: dict[str, Any], *, output_type: str = "pil",
                  return_dict: bool = False, num_prompts: int = 1, single: bool = True) -> Any:
    """Formats images (float arrays; None for "tokens"), codes and seeds, nested per prompt."""
    tokens, images, seeds = (model_outputs[k] for k in ("image_tokens", "images", "seeds"))
    shape = (-1,) if single else (num_prompts, -1)
    image_tokens = tokens.reshape(*shape, tokens.shape[-1])
    if output_type == "tokens":
      result: Any = image_tokens
    elif output_type == "np":
      result = images.reshape(*shape, *images.shape[1:])
    else:
      result = _nest(to_pil(images), num_prompts, single)
    if not return_dict:
      return result
    seeds = None if seeds is None else _nest(seeds, num_prompts, single)
    return TextToImagePipelineOutput(images=result, image_tokens=image_tokens, seeds=seeds)

  # --- the call ----------------------------------------------------------------------------------
  def __call__(
      self,
      prompt: str | list[str],
      *,
      num_images_per_prompt: int | None = None,
      guidance_scale: float | None = None,
      negative_prompt: str | list[str] | None = None,
      temperature: float | None = None,
      top_k: int | None = None,
      top_p: float | None = None,
      seed: int | list[int] | list[list[int]] | None = None,
      prng_key: jax.Array | None = None,
      output_type: str | None = None,
      return_dict: bool | None = None,
      callback_on_step_end: Callable[[TextToImagePipeline, int, dict[str, Any]], Any] | None = None,
      callback_steps: int | None = None,
      callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
      batch_size: int | None = None,
      grid: bool | None = None,
      seamless: bool | None = None,
      **generate_kwargs: Any,
  ) -> Any:
    """Generates images for one prompt or a list of prompts.

    Every argument left None takes the value given to the constructor, else its default.

    Args:
      prompt: a string, or a list of b strings.
      num_images_per_prompt: n images per prompt (default 1).
      guidance_scale: super-conditioning scale (None: the model's generation config; 1 turns
        guidance off; the dalle-mini notebook used 10).
      negative_prompt: replaces the empty unconditional prompt of guidance (one string, or one
        per prompt).
      temperature, top_k, top_p: sampling settings (None: the model's generation config).
      seed: an int (image i gets ``image_seeds(seed, b * n)[i]``), one int per image, or a list
        per prompt (``out.seeds``). None with no ``prng_key``: a random seed, reported in
        ``out.seeds``.
      prng_key: one jax key instead of ``seed``; image i gets ``fold_in(prng_key, i)``.
      output_type: "pil" (default), "np" (float32 in [0, 1]) or "tokens" (codes, no decoding).
      return_dict: return a :class:`TextToImagePipelineOutput` instead of the images alone.
      callback_on_step_end: called as ``callback_on_step_end(pipe, step, callback_kwargs)``
        every ``callback_steps`` tokens (see the module docstring).
      callback_steps: tokens between callbacks and progress bar updates (default 32).
      callback_on_step_end_tensor_inputs: which of "image_tokens", "preview" the callback gets
        (default both; a preview costs a VQGAN decode per image).
      batch_size: the most images per ``generate`` call (None: the constructor's, else all).
      grid: return one grid image per prompt (its n images, squarest rows x cols layout).
      seamless: like ``grid``, but decode the tiled code map at once so the borders blend.
      **generate_kwargs: other ``generate`` settings (``do_sample``, ``suppress_tokens``).

    Returns:
      PIL images: a list of n for a string prompt, a list of b such lists for a list of prompts
      (one image per prompt with ``grid``). "np": an (n, H, W, 3) array, (b, n, H, W, 3) for a
      list. "tokens": (n, image_length) / (b, n, image_length) int32. With ``return_dict``, a
      :class:`TextToImagePipelineOutput`.
    """
    # 1. Merge the call's arguments with the constructor's and the defaults; check them.
    call = {k: v for k, v in locals().items() if k not in ("self", "prompt", "generate_kwargs")}
    params = dict(_DEFAULTS)
    for part in (self._preprocess_params, self._forward_params, self._postprocess_params,
                 *self._sanitize_parameters(**call, **generate_kwargs)):
      params.update(part)
    prompts, single = self._check_prompts(prompt)
    n = _positive_int("num_images_per_prompt", params["num_images_per_prompt"])
    steps = _positive_int("callback_steps", params["callback_steps"])
    if params["output_type"] not in OUTPUT_TYPES:
      raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {params['output_type']!r}.")
    total = len(prompts) * n
    batch = _positive_int("batch_size", params.get("batch_size", self._batch_size), none_ok=True)
    generation = {k: params[k] for k in _GENERATE_KEYS if k in params}
    self._warn_unused_negative_prompt(params, generation)
    self.call_count += 1

    # 2. Tokenize: one row per image, prompt-major.
    model_inputs = self.preprocess(prompts, params.get("negative_prompt"), n)

    # 3. One seed (or key) per image.
    if params.get("seed") is not None and params.get("prng_key") is not None:
      raise ValueError("Pass either seed or prng_key, not both.")
    seeds = keys = None
    if params.get("prng_key") is not None:
      keys = image_keys(total, prng_key=params["prng_key"])
    else:
      seed = params.get("seed")
      seeds = flatten_seeds(secrets.randbelow(2**32) if seed is None else seed, len(prompts), n)

    # 4. Sample image tokens, `batch` images per generate call.
    disabled = self._progress_bar_config.get("disable")
    bar = None if disabled else self.progress_bar(total * self._image_length)
    chunks = []
    try:
      for start in range(0, total, batch or total):
        stop = min(start + (batch or total), total)
        inputs = {k: v[start:stop] for k, v in model_inputs.items()}
        if seeds is not None:
          inputs["seeds"] = seeds[start:stop]
        else:
          inputs["prng_keys"] = keys[start:stop]
        callback = self._step_callback(bar, start, stop, params)
        outputs = self.forward(inputs, callback=callback, callback_steps=steps, **generation)
        chunks.append(outputs["image_tokens"])
    finally:
      if bar is not None:
        bar.close()
    image_tokens = np.concatenate(chunks)  # (b * n, image_length)

    # 5. Decode with the VQGAN (tiling each prompt's images into one grid if asked).
    tiled = params["grid"] or params["seamless"]
    images = None
    if params["output_type"] != "tokens":
      images = self.decode_image_tokens(image_tokens, grid=grid_shape(n) if tiled else None,
                                        seamless=params["seamless"])

    # 6. Format the output.
    outputs = {"image_tokens": image_tokens, "images": images, "seeds": seeds}
    return self.postprocess(outputs, output_type=params["output_type"],
                            return_dict=params["return_dict"], num_prompts=len(prompts),
                            single=single)

  # --- helpers of __call__ -------------------------------------------------------------------------
  @staticmethod
  def _check_prompts(prompt: Any) -> tuple[list[str], bool]:
    if isinstance(prompt, str):
      return [prompt], True
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
      return list(prompt), False
    raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.100}.")

  def _warn_unused_negative_prompt(self, params: dict[str, Any], generation: dict[str, Any]) -> None:
    if params.get("negative_prompt") is None:
      return
    scale = generation.get("guidance_scale", generation.get("condition_scale"))
    if scale is None:
      scale = self.model.generation_config.guidance_scale
    if scale is None or scale == 1:
      logger.warning("negative_prompt has no effect without guidance; pass guidance_scale > 1 "
                     "(the dalle-mini notebook used 10).")

  def _step_callback(self, bar: tqdm | None, start: int, stop: int, params: dict[str, Any]
                     ) -> Callable[[int, np.ndarray], None] | None:
    """The ``generate`` callback for images start..stop-1: progress bar and user callback."""
    user_callback = params.get("callback_on_step_end")
    if bar is None and user_callback is None:
      return None  # generate then samples every token in one jitted scan
    wanted = set(params["callback_on_step_end_tensor_inputs"])
    if wanted - {"image_tokens", "preview"}:
      raise ValueError("callback_on_step_end_tensor_inputs accepts 'image_tokens' and 'preview', "
                       f"got {sorted(wanted)}.")
    done = [0]

    def on_step(step: int, tokens: np.ndarray) -> None:
      if bar is not None:
        bar.update((step - done[0]) * (stop - start))
        done[0] = step
      if user_callback is not None:
        callback_kwargs: dict[str, Any] = {"image_indices": list(range(start, stop))}
        if "image_tokens" in wanted:
          callback_kwargs["image_tokens"] = tokens
        if "preview" in wanted:
          callback_kwargs["preview"] = self.preview(tokens)
        user_callback(self, step, callback_kwargs)

    return on_step

  def preview(self, partial_tokens: np.ndarray) -> list[Image.Image]:
    """Decodes partially sampled images; the tokens not sampled yet are painted gray.

    Args:
      partial_tokens: (m, k) codes, the first k of each image (row-major over the code map).

    Returns:
      m PIL images of the full image size.
    """
    m, k = partial_tokens.shape
    length = self._image_length
    side, factor = math.isqrt(length), self.model.vqgan.config.downsample_factor
    codes = np.zeros((m, length), np.int32)  # code 0 stands in for the unsampled tokens
    codes[:, :k] = partial_tokens
    pixels = to_uint8(self.decode_image_tokens(codes))  # (m, H, W, 3)
    unsampled = (np.arange(length) >= k).reshape(side, side)
    pixels[:, np.kron(unsampled, np.ones((factor, factor), bool))] = _GRAY  # mask (H, W)
    return to_pil(pixels)

  # --- saving ------------------------------------------------------------------------------------
  def save_pretrained(self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "10GB",
                      model_card: bool = True, push_to_hub: bool = False, **push_kwargs: Any) -> None:
    """Writes the single-folder pipeline (see ``dalle_flax.pipelines.loading``) with a
    ``README.md`` model card; ``push_to_hub=True`` also uploads it to ``push_kwargs["repo_id"]``
    (default: the folder name)."""
    folder = self.model.save_pretrained(save_directory, max_shard_size=max_shard_size,
                                        model_card=model_card)
    if push_to_hub:
      repo_id = push_kwargs.pop("repo_id", None) or folder.name
      self.push_to_hub(repo_id, max_shard_size=max_shard_size, **push_kwargs)

  def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
    """Uploads the single-folder pipeline and its model card to ``repo_id`` in one commit; see
    :meth:`DalleMiniPipelineModel.push_to_hub` for the keywords. Returns the commit URL."""
    return self.model.push_to_hub(repo_id, **kwargs)
