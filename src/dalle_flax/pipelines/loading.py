"""Loading and saving the components of a DALL·E mini pipeline (text model, VQGAN, processor).

Example: ``components = DalleMiniPipelineModel.from_pretrained("dalle-mini/dalle-mini")``.

Two repository layouts load:

* **Single folder** (what :meth:`DalleMiniPipelineModel.save_pretrained` and
  ``dalle-flax convert`` write)::

      config.json                 DalleMiniConfig: model_type "dalle-mini", text_config, vqgan_config
      model.safetensors           the text model's parameters (sharded past max_shard_size)
      generation_config.json      the text model's sampling defaults
      vqgan/config.json           the VQGAN, a standalone VQGAN folder
      vqgan/model.safetensors
      vocab.json, merges.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
      processor_config.json, enwiki-words-frequency.txt (when the model normalizes text)
      README.md                   model card (push_to_hub)

  The text model's weights sit at the root, as in transformers' composite models; the root
  ``config.json`` is the single source of truth for both configs.
* **Two repositories**, as the released models: a text model repo (``dalle-mini/dalle-mini``,
  ``dalle-mini/dalle-mega``, ``flax-community/dalle-mini``) and a VQGAN repo. The VQGAN is
  ``vqgan=`` (a repo id, a folder or a :class:`~dalle_flax.FlaxVQGANModel`), or, for the known
  text repos, the VQGAN the original code paired them with, at the revision it pinned
  (:data:`KNOWN_VQGANS`).

This is also the loader ``transformers.pipeline("text-to-image", model=...)`` calls (the task's
registered model class), so it accepts the keyword arguments that factory passes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from ..hub_utils import HubOptions, atomic_write_json, push_folder, read_json_object, resolve_file
from ..modeling_flax_dalle_mini import FlaxDalleMiniForConditionalGeneration
from ..modeling_flax_utils import CONFIG_NAME
from ..modeling_flax_vqgan import FlaxVQGANModel
from ..processing_dalle_mini import DalleMiniProcessor
from .configuration import DalleMiniConfig

logger = logging.getLogger(__name__)

# Inference loads the layers unrolled: with scanned (stacked) layers XLA slices every layer's
# weights out of the stack at each decode step, which makes a mini decode step 2.9x slower on
# CPU (benchmarks/bench_generate.py --layout); generate() then splits the decoder stack per layer
# at every call, which loading unrolled saves. Remat is a training-only memory trade.
INFERENCE_LAYOUT = {"use_scan": False, "gradient_checkpointing": False}

__all__ = [
    "KNOWN_VQGANS",
    "VQGAN_SUBFOLDER",
    "DalleMiniPipelineModel",
    "TextOnlyComponents",
    "build_components",
    "resolve_dtype",
]

VQGAN_SUBFOLDER = "vqgan"

# Text model repo -> (VQGAN repo, pinned revision), as the original code paired them
# (reference dalle-mini.md §1.5-1.6).
_IMAGENET_VQGAN = ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9")
KNOWN_VQGANS: dict[str, tuple[str, str]] = {
    "dalle-mini/dalle-mini": _IMAGENET_VQGAN,
    "dalle-mini/dalle-mega": _IMAGENET_VQGAN,
    "flax-community/dalle-mini": ("flax-community/vqgan_f16_16384",
                                  "90cc46addd2dd8f5be21586a9a23e1b95aa506a9"),
}

# Keywords transformers' pipeline factory passes to the model loader that mean nothing here.
_IGNORED_FACTORY_KWARGS = ("_from_pipeline", "_from_auto", "trust_remote_code", "code_revision")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "float": "float32"}
_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: Any) -> jnp.dtype | None:
  """Maps a user dtype to a jax dtype; None / "auto" give None (keep the default, float32).

  Accepts jax / numpy dtypes, their names ("bfloat16", "bf16", ...) and torch dtypes (by name,
  without importing torch), because transformers' pipeline factory passes those.

  Raises:
    ValueError: a dtype other than float32, bfloat16 or float16.
  """
  if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
    return None
  name = dtype if isinstance(dtype, str) else str(dtype)
  name = name.removeprefix("torch.").lower()
  name = _DTYPE_ALIASES.get(name, name)
  if name not in _DTYPES:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      pass
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {list(_DTYPES)} (or None / 'auto'), got {dtype!r}.")
  return jnp.dtype(name)


def _read_config_dict(path_or_repo_id: str | os.PathLike, options: HubOptions) -> dict[str, Any]:
  return read_json_object(resolve_file(path_or_repo_id, CONFIG_NAME, options))


def _known_vqgan(name_or_path: str) -> tuple[str, str] | None:
  if not name_or_path or Path(name_or_path).exists():
    return None  # a local folder: we cannot know which repo it came from
  return KNOWN_VQGANS.get(name_or_path.strip("/").lower())


@dataclasses.dataclass
class TextOnlyComponents:
  """A text model and processor whose VQGAN is not known yet.

  ``transformers.pipeline("text-to-image", model=<unknown text-only repo>, vqgan=...)`` loads the
  model before the pipeline sees ``vqgan=``, so the loader returns this instead of failing, and
  :class:`~dalle_flax.TextToImagePipeline` completes it with its ``vqgan`` argument (or raises).
  """

  text_model: FlaxDalleMiniForConditionalGeneration
  processor: DalleMiniProcessor
  name_or_path: str


def missing_vqgan_error(path: str, model_type: Any) -> ValueError:
  return ValueError(
      f"{path!r} holds a text model only (config.json model_type {model_type or 'missing'!r}) and is "
      "not a known DALL·E mini repo, so its VQGAN is unknown. Pass vqgan=<VQGAN repo id or folder> "
      "(CLI: --vqgan), e.g. vqgan='dalle-mini/vqgan_imagenet_f16_16384' for models trained like "
      "mini-1 / mega-1, or convert it to a single folder with `dalle-flax convert`."
  )


class DalleMiniPipelineModel:
  """A DALL·E mini text model, the VQGAN that decodes its codes, and its text processor.

  This is ``pipe.model`` of a :class:`~dalle_flax.TextToImagePipeline`.

  Attributes:
    text_model: :class:`~dalle_flax.FlaxDalleMiniForConditionalGeneration`, prompt -> codes.
    vqgan: :class:`~dalle_flax.FlaxVQGANModel`, codes -> images (always float32, as min-dalle:
      the VQGAN loses visible quality in half precision).
    processor: :class:`~dalle_flax.DalleMiniProcessor`, prompts -> token arrays.
    config: the composite :class:`DalleMiniConfig` of the two models.
    name_or_path: where the components were loaded from ("" when built from objects).
  """

  def __init__(
      self,
      text_model: FlaxDalleMiniForConditionalGeneration,
      vqgan: FlaxVQGANModel,
      processor: DalleMiniProcessor,
      *,
      name_or_path: str = "",
  ):
    expected = (("text_model", text_model, FlaxDalleMiniForConditionalGeneration),
                ("vqgan", vqgan, FlaxVQGANModel), ("processor", processor, DalleMiniProcessor))
    for name, value, cls in expected:
      if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}.")
    self.text_model = text_model
    self.vqgan = vqgan
    self.processor = processor
    self.config = DalleMiniConfig(text_config=text_model.config, vqgan_config=vqgan.config)
    self.config.architectures = [type(self).__name__]
    self.name_or_path = str(name_or_path)
    # How the text model was fine-tuned (set by dalle_flax.training.train; shown in the card).
    self.training_info: dict[str, Any] | None = None

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, "
            f"text_model={self.text_model.num_parameters():,} params, "
            f"vqgan={self.vqgan.num_parameters():,} params, image_size={self.config.image_size})")

  @property
  def generation_config(self) -> Any:
    """The text model's ``GenerationConfig`` (the pipeline's sampling defaults)."""
    return self.text_model.generation_config

  @property
  def dtype(self) -> jnp.dtype:
    """Computation dtype of the text model."""
    return self.text_model.dtype

  def num_parameters(self) -> int:
    return self.text_model.num_parameters() + self.vqgan.num_parameters()

  # --- loading ---------------------------------------------------------------------------------
  @classmethod
  def from_pretrained(
      cls,
      pretrained_model_name_or_path: str | os.PathLike,
      *,
      vqgan: str | os.PathLike | FlaxVQGANModel | None = None,
      vqgan_revision: str | None = None,
      processor: str | os.PathLike | DalleMiniProcessor | None = None,
      revision: str | None = None,
      cache_dir: str | os.PathLike | None = None,
      token: str | bool | None = None,
      local_files_only: bool = False,
      force_download: bool = False,
      dtype: Any = None,
      config: Any = None,
      verify_checksums: bool = True,
      **kwargs: Any,
  ) -> DalleMiniPipelineModel | TextOnlyComponents:
    """Loads a single-folder pipeline or a text model repo plus its VQGAN.

    Args:
      pretrained_model_name_or_path: a folder or Hub repo id: a pipeline folder (``config.json``
        with ``model_type: "dalle-mini"``) or a text model (``"dallebart"``, or the 2021 seed).
      vqgan: the VQGAN to use instead of the folder's ``vqgan/`` or the text repo's default: a
        repo id, a folder or a loaded ``FlaxVQGANModel``. Required for unknown text-only repos.
      vqgan_revision: revision of a ``vqgan`` repo id (default: its main branch).
      processor: a ``DalleMiniProcessor`` or where to load it from (default: the model's path).
      revision: branch, tag or commit of ``pretrained_model_name_or_path``.
      cache_dir, token, local_files_only, force_download: Hub download settings.
      dtype: computation dtype of the text model (float32, bfloat16, float16; None / "auto":
        float32). Parameters keep the dtype they were stored in.
      verify_checksums: check each model's weight files against the ``checksums.sha256`` that
        ``save_pretrained`` writes beside them (False: skip the hashing, about 1 s per GB).
      config: ignored unless a :class:`DalleMiniConfig` (transformers' factory passes the config
        it read; the loader reads it again itself).
      **kwargs: only the loader keywords transformers' pipeline factory passes.

    Returns:
      The loaded components; when transformers' factory loads an unknown text-only repo (no
      VQGAN known yet), :class:`TextOnlyComponents`.

    Raises:
      FileNotFoundError: the path, repo, revision or a required file does not exist.
      OSError: the Hub cannot be reached and the files are not cached.
      ValueError: an unknown text-only repo without ``vqgan=``, or mismatched components.
    """
    from_factory = kwargs.get("_from_pipeline") is not None
    for key in _IGNORED_FACTORY_KWARGS:
      kwargs.pop(key, None)
    if kwargs:
      raise TypeError(
          f"{cls.__name__}.from_pretrained got unsupported keyword arguments {sorted(kwargs)}; "
          "accepted: vqgan, vqgan_revision, processor, revision, cache_dir, token, "
          "local_files_only, force_download, dtype, verify_checksums."
      )
    path = os.fspath(pretrained_model_name_or_path)
    options = HubOptions(revision, cache_dir, token, local_files_only, force_download)
    model_dtype = resolve_dtype(dtype) or jnp.float32
    raw = _read_config_dict(path, options)
    hub = dict(revision=revision, cache_dir=cache_dir, token=token,
               local_files_only=local_files_only, force_download=force_download)
    if raw.get("model_type") == DalleMiniConfig.model_type:
      pipeline_config = config if isinstance(config, DalleMiniConfig) else None
      pipeline_config = pipeline_config or DalleMiniConfig.from_dict(raw)
      logger.info("Loading the single-folder pipeline %s", path)
      text_config = copy.deepcopy(pipeline_config.text_config)
      text_config.update(INFERENCE_LAYOUT)
      text_model = FlaxDalleMiniForConditionalGeneration.from_pretrained(
          path, config=text_config, dtype=model_dtype, verify_checksums=verify_checksums, **hub)
      if vqgan is None:
        vqgan = FlaxVQGANModel.from_pretrained(
            path, subfolder=VQGAN_SUBFOLDER, config=pipeline_config.vqgan_config,
            verify_checksums=verify_checksums, **hub)
    else:
      known = _known_vqgan(path) if vqgan is None else None
      if vqgan is None and known is None and not from_factory:
        raise missing_vqgan_error(path, raw.get("model_type"))  # before reading gigabytes
      logger.info("Loading the text model %s", path)
      text_model = FlaxDalleMiniForConditionalGeneration.from_pretrained(
          path, dtype=model_dtype, verify_checksums=verify_checksums, **INFERENCE_LAYOUT, **hub)
      if vqgan is None and known is None:
        processor = cls._load_processor(processor if processor is not None else path, hub)
        return TextOnlyComponents(text_model, processor, path)
      if vqgan is None:
        vqgan, vqgan_revision = known
        logger.info("Using %s's VQGAN %s @ %s", path, vqgan, vqgan_revision)
    vqgan_model = cls._load_vqgan(vqgan, vqgan_revision, options, verify_checksums)
    processor = cls._load_processor(processor if processor is not None else path, hub)
    return cls(text_model, vqgan_model, processor, name_or_path=path)

  @staticmethod
  def _load_vqgan(vqgan: Any, revision: str | None, options: HubOptions,
                  verify_checksums: bool = True) -> FlaxVQGANModel:
    if isinstance(vqgan, FlaxVQGANModel):
      return vqgan
    if not isinstance(vqgan, (str, os.PathLike)):
      raise TypeError("vqgan must be a repo id, a folder or a FlaxVQGANModel, got "
                      f"{type(vqgan).__name__}.")
    return FlaxVQGANModel.from_pretrained(
        vqgan, revision=revision, cache_dir=options.cache_dir, token=options.token,
        local_files_only=options.local_files_only, force_download=options.force_download,
        verify_checksums=verify_checksums)

  @staticmethod
  def _load_processor(processor: Any, hub: dict[str, Any]) -> DalleMiniProcessor:
    if isinstance(processor, DalleMiniProcessor):
      return processor
    if not isinstance(processor, (str, os.PathLike)):
      raise TypeError(
          "processor must be a DalleMiniProcessor or a path / repo id, got "
          f"{type(processor).__name__}."
      )
    return DalleMiniProcessor.from_pretrained(processor, **hub)

  # --- saving ----------------------------------------------------------------------------------
  def save_pretrained(
      self, save_directory: str | os.PathLike, *, max_shard_size: int | str = "10GB",
      model_card: bool = True,
  ) -> Path:
    """Writes the single-folder layout described in this module's docstring.

    The root ``config.json`` (the composite config) is written last, so an interrupted save
    never looks like a complete pipeline folder. Unless ``model_card=False`` a ``README.md``
    model card is written too (repo id: the folder name).

    Returns:
      The folder written.
    """
    folder = Path(save_directory)
    if folder.is_file():
      raise ValueError(f"save_directory {str(folder)!r} is a file; give a folder path.")
    folder.mkdir(parents=True, exist_ok=True)
    self.vqgan.save_pretrained(folder / VQGAN_SUBFOLDER, max_shard_size=max_shard_size)
    self.processor.save_pretrained(folder)
    self.text_model.save_pretrained(folder, max_shard_size=max_shard_size)
    config = self.config.to_dict()
    config["text_config"]["architectures"] = [type(self.text_model).__name__]
    config["vqgan_config"]["architectures"] = [type(self.vqgan).__name__]
    atomic_write_json(folder / CONFIG_NAME, config)
    if model_card:
      (folder / "README.md").write_text(self.model_card(folder.name), encoding="utf-8")
    return folder

  def model_card(self, repo_id: str, tags: Sequence[str] | None = None) -> str:
    """Renders the pipeline model card (``model_cards/pipeline.md``) for ``repo_id``."""
    from ..model_cards import render_model_card

    source = self.name_or_path
    base_model = source if source and not os.path.exists(source) else None
    return render_model_card(
        "pipeline.md", repo_id=repo_id, text_config=self.config.text_config,
        vqgan_config=self.config.vqgan_config, image_size=self.config.image_size,
        text_parameters=self.text_model.num_parameters(),
        vqgan_parameters=self.vqgan.num_parameters(), base_model=base_model,
        tags=list(tags or ()), training=self.training_info)

  def push_to_hub(
      self, repo_id: str, *, commit_message: str | None = None,
      commit_description: str | None = None, private: bool | None = None,
      token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
      max_shard_size: int | str = "10GB", tags: Sequence[str] | None = None,
  ) -> str:
    """Uploads the single-folder layout and its model card to ``repo_id`` in one commit.

    Returns:
      The commit URL.
    """
    def write(folder: Path) -> None:
      self.save_pretrained(folder, max_shard_size=max_shard_size, model_card=False)
      (folder / "README.md").write_text(self.model_card(repo_id, tags), encoding="utf-8")

    return push_folder(repo_id, write, commit_message=commit_message or "Upload DALL·E mini pipeline",
                       commit_description=commit_description, private=private, token=token,
                       revision=revision, create_pr=create_pr)


def build_components(
    model: Any, *, processor: Any = None, tokenizer: Any = None, vqgan: Any = None, dtype: Any = None,
) -> DalleMiniPipelineModel:
  """Turns what a pipeline was given into its components.

  Args:
    model: a :class:`DalleMiniPipelineModel`, :class:`TextOnlyComponents`, a
      ``FlaxDalleMiniForConditionalGeneration`` (needs ``vqgan`` and ``processor`` or
      ``tokenizer``), or a folder / repo id to load.
    processor: replaces the processor (a ``DalleMiniProcessor`` or where to load it from).
    tokenizer: a ``DalleBartTokenizer`` to build the processor from, for a bare text model.
    vqgan: replaces the VQGAN (a ``FlaxVQGANModel``, folder or repo id).
    dtype: computation dtype when ``model`` is a path; for a loaded model only checked.

  Raises:
    ValueError: a text model without a VQGAN or without a processor / tokenizer.
    TypeError: an unsupported ``model``.
  """
  if isinstance(model, (str, os.PathLike)):
    loaded = DalleMiniPipelineModel.from_pretrained(model, vqgan=vqgan, processor=processor,
                                                    dtype=dtype)
    assert isinstance(loaded, DalleMiniPipelineModel)  # only the factory gets TextOnlyComponents
    return loaded
  if isinstance(model, DalleMiniPipelineModel):
    wanted = resolve_dtype(dtype)
    if wanted is not None and wanted != model.dtype:
      logger.warning("dtype=%s is ignored: the model is already loaded in %s; pass dtype when "
                     "loading it.", wanted, model.dtype)
    if vqgan is None and processor is None:
      return model
    text_model, name = model.text_model, model.name_or_path
    vqgan = model.vqgan if vqgan is None else vqgan
    processor = model.processor if processor is None else processor
  elif isinstance(model, TextOnlyComponents):
    if vqgan is None:
      raise missing_vqgan_error(model.name_or_path, model.text_model.config.model_type)
    text_model, name = model.text_model, model.name_or_path
    processor = model.processor if processor is None else processor
  elif isinstance(model, FlaxDalleMiniForConditionalGeneration):
    text_model, name = model, ""
    if vqgan is None:
      raise ValueError(
          "model is a text model only; pass vqgan=<FlaxVQGANModel, folder or repo id> (e.g. "
          "'dalle-mini/vqgan_imagenet_f16_16384'), or load a whole pipeline by path."
      )
    if processor is None:
      if tokenizer is None:
        raise ValueError(
            "model is a text model only; pass processor=DalleMiniProcessor.from_pretrained"
            "(<text model repo>) or tokenizer=<its DalleBartTokenizer>."
        )
      processor = DalleMiniProcessor(tokenizer, normalize_text=bool(model.config.normalize_text),
                                     max_text_length=model.config.max_text_length)
  else:
    raise TypeError(
        "model must be a DalleMiniPipelineModel, a FlaxDalleMiniForConditionalGeneration or a "
        f"folder / repo id, got {type(model).__name__}."
    )
  vqgan = DalleMiniPipelineModel._load_vqgan(vqgan, None, HubOptions())
  processor = DalleMiniPipelineModel._load_processor(processor, {})
  return DalleMiniPipelineModel(text_model, vqgan, processor, name_or_path=name)
