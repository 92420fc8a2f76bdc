"""TextToImagePipeline: outputs, seeds, progress, grids, loading layouts, Hub, transformers.pipeline.

Everything runs on the tiny pipeline tests/fixtures/tiny-dalle-mini (16 image tokens, 64x64
images). Each load builds new model objects, which jit sees as new static arguments and
recompiles (~8 s on 2 cores); the module enables jax's persistent compilation cache in a
temporary folder, shared with the torch-blocked subprocess, so a recompile is a disk hit.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import dalle_flax
from dalle_flax import cli
from dalle_flax import DalleMiniConfig, TextToImagePipeline, TextToImagePipelineOutput, VQGANConfig
from dalle_flax.pipelines import KNOWN_VQGANS, DalleMiniPipelineModel, grid_shape, image_seeds
from dalle_flax.testing.torch_blocker import BLOCK_TORCH

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny-dalle-mini"
SHARED = REPO.parent / "shared" / "fixtures"
PROMPTS = ["a red apple", "a blue car"]



def cache_env(cache_dir):
  # the same XLA optimisation level as this process (conftest lowers it for unit tests), so a
  # subprocess computes bit-identical numbers
  same_opt = "1" if jax.config.values.get("jax_disable_most_optimizations") else "0"
  return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_DISABLE_MOST_OPTIMIZATIONS": same_opt,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def pipe(jax_cache):
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def legacy_copies(tmp_path_factory):
  """Writable copies of the two-repo fixtures the tiny pipeline was converted from."""
  if not (SHARED / "dallebart-mini-like").is_dir():
    pytest.skip("the shared golden fixtures are not available")
  root = tmp_path_factory.mktemp("legacy")
  ignore = shutil.ignore_patterns("expected", "README.txt")
  text = shutil.copytree(SHARED / "dallebart-mini-like", root / "text", ignore=ignore)
  vqgan = shutil.copytree(SHARED / "vqgan-f16-like", root / "vqgan", ignore=ignore)
  for path in (text, vqgan, *text.iterdir(), *vqgan.iterdir()):
    path.chmod(0o755 if path.is_dir() else 0o644)
  return text, vqgan


def uint8(images):
  return np.stack([np.asarray(image) for image in images])


# --- outputs ----------------------------------------------------------------------------------------
def test_output_types_nest_like_the_prompt(pipe):
  images = pipe(PROMPTS[0], num_images_per_prompt=2, seed=5)
  assert isinstance(images, list) and len(images) == 2
  assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in images)
  array = pipe(PROMPTS[0], num_images_per_prompt=2, seed=5, output_type="np")
  assert array.shape == (2, 64, 64, 3) and array.dtype == np.float32
  assert 0.0 <= array.min() and array.max() <= 1.0
  np.testing.assert_array_equal(uint8(images), (array * 255).astype(np.uint8))  # to_uint8 floors
  tokens = pipe(PROMPTS[0], num_images_per_prompt=2, seed=5, output_type="tokens")
  assert tokens.shape == (2, 16) and tokens.dtype == np.int32
  assert not np.array_equal(tokens[0], tokens[1])  # two seeds, two images

  nested = pipe(PROMPTS, seed=5)
  assert len(nested) == 2 and all(len(per_prompt) == 1 for per_prompt in nested)
  out = pipe(PROMPTS, seed=5, output_type="np", return_dict=True)
  assert isinstance(out, TextToImagePipelineOutput)
  assert out.images.shape == (2, 1, 64, 64, 3) and out.image_tokens.shape == (2, 1, 16)
  assert out.seeds == [[5], [image_seeds(5, 2)[1]]]
  assert out["images"] is out.images and out[1] is out.image_tokens
  np.testing.assert_array_equal(uint8([nested[0][0], nested[1][0]]),
                                (out.images[:, 0] * 255).astype(np.uint8))


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pipeline_and_generate_give_the_same_images_for_a_seed(pipe, guidance_scale):
  batch = pipe.processor(PROMPTS)
  out = pipe.model.text_model.generate(**batch, seed=6, num_return_sequences=2, guidance_scale=guidance_scale)
  tokens = pipe(PROMPTS, seed=6, num_images_per_prompt=2, guidance_scale=guidance_scale, output_type="tokens",
                return_dict=True)
  np.testing.assert_array_equal(tokens.image_tokens.reshape(4, -1), out.image_tokens)
  assert [s for per_prompt in tokens.seeds for s in per_prompt] == out.seeds == image_seeds(6, 4)
  first = pipe.model.text_model.generate(**pipe.processor(PROMPTS[:1]), seed=6, guidance_scale=guidance_scale)
  np.testing.assert_array_equal(first.image_tokens[0], out.image_tokens[0])  # seed=s: image 0 is seed s


def test_seed_derivation_is_stable():
  # Regenerating an old image needs the same derivation forever: pin it.
  assert image_seeds(7, 3) == [7, 369571992, 1009178997]
  assert image_seeds(0, 1) == [0]
  with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
    image_seeds(-1, 2)


def test_any_image_regenerates_alone_and_batching_does_not_matter(pipe):
  out = pipe(PROMPTS, seed=7, output_type="tokens", return_dict=True)
  assert out.seeds[0] == [7]
  alone = pipe(PROMPTS[1], seed=out.seeds[1][0], output_type="tokens")
  np.testing.assert_array_equal(alone[0], out.image_tokens[1][0])
  one_by_one = pipe(PROMPTS, seed=7, output_type="tokens", batch_size=1)
  np.testing.assert_array_equal(one_by_one, out.image_tokens)
  again = pipe(PROMPTS, seed=out.seeds, output_type="tokens")  # nested seeds, as returned
  np.testing.assert_array_equal(again, out.image_tokens)
  other = pipe(PROMPTS, seed=8, output_type="tokens")
  assert not np.array_equal(other, out.image_tokens)

  key = jax.random.key(3)
  by_key = pipe(PROMPTS, prng_key=key, output_type="tokens", return_dict=True)
  assert by_key.seeds is None
  np.testing.assert_array_equal(pipe(PROMPTS, prng_key=key, output_type="tokens", batch_size=1),
                                by_key.image_tokens)
  random_seed = pipe(PROMPTS[0], output_type="tokens", return_dict=True)  # no seed: random, reported
  np.testing.assert_array_equal(pipe(PROMPTS[0], seed=random_seed.seeds[0], output_type="tokens"),
                                random_seed.image_tokens)


def test_call_argument_errors(pipe):
  with pytest.raises(ValueError, match="output_type"):
    pipe(PROMPTS[0], output_type="latent")
  with pytest.raises(ValueError, match="expected 4"):
    pipe(PROMPTS, num_images_per_prompt=2, seed=[1, 2, 3])
  with pytest.raises(ValueError, match="num_images_per_prompt"):
    pipe(PROMPTS[0], num_images_per_prompt=0)
  with pytest.raises(ValueError, match="either seed or prng_key"):
    pipe(PROMPTS[0], seed=1, prng_key=jax.random.key(1))
  with pytest.raises(TypeError, match="num_image_per_prompt"):
    pipe(PROMPTS[0], num_image_per_prompt=2)
  with pytest.raises(TypeError, match="non-empty list"):
    pipe([])
  with pytest.raises(ValueError, match="temperature"):
    pipe(PROMPTS[0], seed=1, temperature=0.0)


# --- progress and previews --------------------------------------------------------------------------
def test_progress_bar_and_progressive_previews(pipe):
  calls = []
  stream = io.StringIO()
  pipe.set_progress_bar_config(file=stream, ascii=True)
  try:
    out = pipe(PROMPTS[0], num_images_per_prompt=2, seed=3, callback_steps=4, return_dict=True,
               callback_on_step_end=lambda p, step, kwargs: calls.append((p, step, kwargs)))
  finally:
    pipe.set_progress_bar_config(disable=True)
  assert "32/32" in stream.getvalue()  # 2 images x 16 tokens
  assert [step for _, step, _ in calls] == [4, 8, 12, 16]
  assert all(p is pipe for p, _, _ in calls)
  first = calls[0][2]
  assert first["image_indices"] == [0, 1]
  np.testing.assert_array_equal(first["image_tokens"], out.image_tokens[:, :4])
  preview = uint8(first["preview"])  # 4 of 16 codes = the top code row of a 4x4 map
  assert preview.shape == (2, 64, 64, 3)
  assert (preview[:, 16:] == 128).all() and not (preview[:, :16] == 128).all()
  np.testing.assert_array_equal(uint8(calls[-1][2]["preview"]), uint8(out.images))
  only_tokens = []
  pipe(PROMPTS[0], num_images_per_prompt=2, seed=3, callback_steps=4, output_type="tokens",
       callback_on_step_end=lambda p, s, kw: only_tokens.append(sorted(kw)),
       callback_on_step_end_tensor_inputs=["image_tokens"])
  assert only_tokens == [["image_indices", "image_tokens"]] * 4


# --- grids ------------------------------------------------------------------------------------------
def test_grid_and_seamless(pipe):
  assert grid_shape(4) == (2, 2) and grid_shape(6) == (2, 3) and grid_shape(5) == (1, 5)
  tiles = pipe(PROMPTS[0], num_images_per_prompt=2, seed=4, output_type="np")
  grids = pipe(PROMPTS[0], num_images_per_prompt=2, seed=4, output_type="np", grid=True)
  assert grids.shape == (1, 64, 128, 3)
  np.testing.assert_array_equal(grids[0], np.concatenate([tiles[0], tiles[1]], axis=1))
  pil_grids = pipe(PROMPTS[0], num_images_per_prompt=2, seed=4, grid=True)
  assert len(pil_grids) == 1 and pil_grids[0].size == (128, 64)
  np.testing.assert_array_equal(np.asarray(pil_grids[0]), (grids[0] * 255).astype(np.uint8))
  seamless = pipe(PROMPTS[0], num_images_per_prompt=2, seed=4, output_type="np", seamless=True)
  assert seamless.shape == grids.shape
  assert not np.array_equal(seamless, grids)  # one joined code map: borders blend


# --- guidance ---------------------------------------------------------------------------------------
def test_guidance_and_negative_prompt(pipe, caplog):
  plain = pipe(PROMPTS[0], seed=9, output_type="tokens")
  guided = pipe(PROMPTS[0], seed=9, output_type="tokens", guidance_scale=4.0)
  negative = pipe(PROMPTS[0], seed=9, output_type="tokens", guidance_scale=4.0,
                  negative_prompt="a blue car")
  assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative)
  with caplog.at_level("WARNING"):
    pipe(PROMPTS[0], seed=9, output_type="tokens", negative_prompt="a blue car")
  assert "no effect without guidance" in caplog.text
  defaults = TextToImagePipeline(pipe.model, guidance_scale=4.0)  # constructor defaults
  defaults.set_progress_bar_config(disable=True)
  np.testing.assert_array_equal(defaults(PROMPTS[0], seed=9, output_type="tokens"), guided)


# --- loading ----------------------------------------------------------------------------------------
def test_two_repo_layout_loads_like_the_converted_folder(pipe, legacy_copies):
  text, vqgan = legacy_copies
  legacy = dalle_flax.pipeline("text-to-image", model=text, vqgan=vqgan)
  legacy.set_progress_bar_config(disable=True)
  np.testing.assert_array_equal(legacy(PROMPTS, seed=2, output_type="np"),
                                pipe(PROMPTS, seed=2, output_type="np"))
  with pytest.raises(ValueError, match=r"vqgan=.*--vqgan"):
    dalle_flax.pipeline("text-to-image", model=text)
  with pytest.raises(ValueError, match="pass vqgan="):
    TextToImagePipeline(legacy.model.text_model, processor=legacy.processor)
  from_objects = TextToImagePipeline(legacy.model.text_model, vqgan=legacy.model.vqgan,
                                     tokenizer=legacy.processor.tokenizer)
  assert from_objects.processor.max_text_length == 16 and from_objects.processor.normalize_text


def test_known_text_repos_get_their_pinned_vqgan_and_notebook_settings(local_hub, legacy_copies, pipe, tmp_path):
  text, vqgan = legacy_copies
  repo, pinned = KNOWN_VQGANS["dalle-mini/dalle-mini"]
  assert (repo, pinned) == ("dalle-mini/vqgan_imagenet_f16_16384",
                            "e93a26e7707683d349bf5d5c41c5b0ef69b677a9")
  assert KNOWN_VQGANS["flax-community/dalle-mini"] == (
      "flax-community/vqgan_f16_16384", "90cc46addd2dd8f5be21586a9a23e1b95aa506a9")
  for repo_id, folder in (("dalle-mini/dalle-mini", text), (repo, vqgan)):
    local_hub.api.create_repo(repo_id)
    local_hub.api.upload_folder(repo_id=repo_id, folder_path=folder)
  # main of the VQGAN repo gets a broken config: only the pinned revision may be used
  local_hub.api.create_branch(repo, branch=pinned)
  local_hub.api.upload_file(repo_id=repo, path_or_fileobj=b"{", path_in_repo="config.json")
  hub_pipe = dalle_flax.pipeline("text-to-image", model="dalle-mini/dalle-mini")
  hub_pipe.set_progress_bar_config(disable=True)
  # the released repos ship no generation_config.json: they get the original notebook's
  # guidance scale 10 and top-k 50, and `dalle-flax convert` writes them down
  assert hub_pipe.model.generation_config.guidance_scale == 10.0
  assert hub_pipe.model.generation_config.top_k == 50
  assert pipe.model.generation_config.guidance_scale is None  # a local folder gets none
  tokens = hub_pipe(PROMPTS, seed=2, output_type="tokens")
  np.testing.assert_array_equal(tokens, pipe(PROMPTS, seed=2, output_type="tokens", guidance_scale=10.0))
  assert (tokens != pipe(PROMPTS, seed=2, output_type="tokens")).any()
  assert cli.main(["convert", "dalle-mini/dalle-mini", "--out", str(tmp_path / "converted")]) == 0
  written = json.loads((tmp_path / "converted" / "generation_config.json").read_text())
  assert written["guidance_scale"] == 10.0 and written["top_k"] == 50
  local_hub.api.create_repo("someone/text-only")
  local_hub.api.upload_folder(repo_id="someone/text-only", folder_path=text)
  with pytest.raises(ValueError, match="not a known DALL·E mini repo"):
    dalle_flax.pipeline("text-to-image", model="someone/text-only")


def test_config_and_loader_errors(pipe, tmp_path):
  with pytest.raises(ValueError, match="n_embed=16384 is larger"):
    DalleMiniConfig(text_config=pipe.model.config.text_config, vqgan_config=VQGANConfig())
  with pytest.raises(FileNotFoundError):
    dalle_flax.pipeline("text-to-image", model=tmp_path / "missing")
  with pytest.raises(KeyError, match="text-to-image"):
    dalle_flax.pipeline("image-to-text", model=TINY)
  with pytest.raises(TypeError, match="device_map"):
    DalleMiniPipelineModel.from_pretrained(TINY, device_map="auto")
  with pytest.raises(ValueError, match="dtype must be one of"):
    dalle_flax.pipeline("text-to-image", model=TINY, dtype="int8")


def test_save_push_and_reload(pipe, local_hub, tmp_path):
  pipe.save_pretrained(tmp_path / "saved")
  config = json.loads((tmp_path / "saved" / "config.json").read_text())
  assert config["model_type"] == "dalle-mini" and config["text_config"]["image_length"] == 16
  assert (tmp_path / "saved" / "vqgan" / "model.safetensors").is_file()
  card = (tmp_path / "saved" / "README.md").read_text()
  assert "pipeline_tag: text-to-image" in card and "# saved" in card
  url = pipe.push_to_hub("me/tiny-pipe", tags=["tiny"])
  assert "me/tiny-pipe" in url
  files = set(local_hub.api.list_repo_files("me/tiny-pipe"))
  assert {"config.json", "model.safetensors", "generation_config.json", "vqgan/config.json",
          "vqgan/model.safetensors", "tokenizer.json", "README.md"} <= files
  reloaded = dalle_flax.pipeline("text-to-image", model="me/tiny-pipe")
  reloaded.set_progress_bar_config(disable=True)
  np.testing.assert_array_equal(reloaded(PROMPTS, seed=1, output_type="tokens"),
                                pipe(PROMPTS, seed=1, output_type="tokens"))
  card = Path(local_hub.api.hf_hub_download("me/tiny-pipe", "README.md")).read_text()
  assert "# me/tiny-pipe" in card and "\n- tiny\n" in card


# --- transformers.pipeline and the torch-free factory --------------------------------------------
def test_transformers_pipeline_matches_torch_free_pipeline(local_hub, jax_cache, tmp_path, pipe):
  pytest.importorskip("torch")
  import transformers

  local_hub.api.create_repo("me/tiny-dalle-mini")
  local_hub.api.upload_folder(repo_id="me/tiny-dalle-mini", folder_path=TINY)
  hf_pipe = transformers.pipeline("text-to-image", model="me/tiny-dalle-mini")
  assert isinstance(hf_pipe, TextToImagePipeline)
  hf_pipe.set_progress_bar_config(disable=True)
  expected = uint8(hf_pipe("a red apple", num_images_per_prompt=2, seed=11))
  np.testing.assert_array_equal(uint8(pipe("a red apple", num_images_per_prompt=2, seed=11)), expected)
  by_object = transformers.pipeline("text-to-image", model=pipe.model, dtype=None)
  assert by_object.model is pipe.model

  script = BLOCK_TORCH + textwrap.dedent(f"""
      import numpy as np, dalle_flax, transformers
      assert not transformers.utils.is_torch_available()
      pipe = dalle_flax.pipeline("text-to-image", model="me/tiny-dalle-mini")
      pipe.set_progress_bar_config(disable=True)
      images = pipe("a red apple", num_images_per_prompt=2, seed=11)
      np.save({str(tmp_path / "images.npy")!r}, np.stack([np.asarray(im) for im in images]))
      assert sys.modules["torch"] is None and not [m for m in sys.modules if m.startswith("torch.")]
  """)
  env = {**os.environ, **cache_env(jax_cache), "HF_ENDPOINT": local_hub.endpoint,
         "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
  env.pop("HF_HUB_OFFLINE", None)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  np.testing.assert_array_equal(np.load(tmp_path / "images.npy"), expected)


def test_transformers_pipeline_completes_text_only_repo_with_vqgan(legacy_copies, pipe):
  pytest.importorskip("torch")
  import transformers

  text, vqgan = legacy_copies
  hf_pipe = transformers.pipeline("text-to-image", model=str(text), vqgan=str(vqgan))
  hf_pipe.set_progress_bar_config(disable=True)
  np.testing.assert_array_equal(hf_pipe(PROMPTS, seed=6, output_type="tokens"),
                                pipe(PROMPTS, seed=6, output_type="tokens"))
  with pytest.raises(ValueError, match="not a known DALL·E mini repo"):
    transformers.pipeline("text-to-image", model=str(text))


# --- CLIP re-ranking --------------------------------------------------------------------------------
def _tiny_clip(folder):
  import torch
  import transformers
  from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

  vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
  for token in [c + suffix for suffix in ("", "</w>") for c in "abcdefghijklmnopqrstuvwxyz"]:
    vocab[token] = len(vocab)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text("#version: 0.2\n")
  image_processor_class = getattr(transformers, "CLIPImageProcessorPil",
                                  transformers.CLIPImageProcessor)
  image_processor = image_processor_class(size={"shortest_edge": 32},
                                          crop_size={"height": 32, "width": 32})
  processor = CLIPProcessor(
      image_processor=image_processor,
      tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")))
  text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
              pad_token_id=1)
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=32, patch_size=8)
  torch.manual_seed(0)
  model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
  model.save_pretrained(folder / "clip")
  processor.save_pretrained(folder / "clip")
  return model, processor


def test_rerank_with_clip_sorts_by_clip_score(tmp_path):
  torch = pytest.importorskip("torch")
  model, processor = _tiny_clip(tmp_path)
  rng = np.random.RandomState(0)
  images = [Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(5)]
  ranked, scores = dalle_flax.rerank_with_clip(images, "a red fox", model=tmp_path / "clip",
                                               batch_size=2, return_scores=True)
  with torch.no_grad():
    inputs = processor(text=["a red fox"], images=images, return_tensors="pt", padding=True)
    expected = model(**inputs).logits_per_image[:, 0].tolist()
  order = sorted(range(5), key=lambda i: -expected[i])
  assert [images.index(im) for im in ranked] == order
  np.testing.assert_allclose(scores, [expected[i] for i in order], rtol=1e-4, atol=1e-5)
  assert len(set(np.round(scores, 6))) == 5  # distinct scores: the order is meaningful
  as_array = np.stack([np.asarray(im) for im in images])
  loaded = dalle_flax.rerank_with_clip(as_array, "a red fox", model=model, processor=processor)
  assert [np.asarray(im).tobytes() for im in loaded] == [np.asarray(im).tobytes() for im in ranked]


def test_2021_seed_model_through_the_pipeline_and_cli_with_its_own_text_length(tmp_path, capsys):
  seed_model, vqgan = SHARED / "bart2021-seed", SHARED / "vqgan-f16-like"
  if not seed_model.is_dir():
    pytest.skip("the shared golden fixtures are not available")
  from dalle_flax import DalleMiniProcessor

  processor = DalleMiniProcessor.from_pretrained(seed_model)
  # min(128 as the 2021 notebook, the fixture's 32 positions), not the DALL·E mini default of 64
  assert processor.max_text_length == 32 and not processor.normalize_text
  long_prompt = " ".join(["a red apple on a wooden table"] * 10)
  assert processor([long_prompt])["input_ids"].shape == (1, 32)
  seed_pipe = dalle_flax.pipeline("text-to-image", model=str(seed_model), vqgan=str(vqgan))
  seed_pipe.set_progress_bar_config(disable=True)
  assert seed_pipe.processor.max_text_length == seed_pipe.model.text_model.config.max_text_length == 32
  images = seed_pipe([long_prompt, "a red apple"], seed=0)
  assert [len(per_prompt) for per_prompt in images] == [1, 1]
  second = str(image_seeds(0, 2)[1])  # image 1 of the call, regenerated alone by the CLI
  assert cli.main(["generate", "a red apple", "--model", str(seed_model), "--vqgan", str(vqgan), "--seed", second,
                   "--out", str(tmp_path), "--no-progress"]) == 0
  written = Path(capsys.readouterr().out.split()[-1])
  np.testing.assert_array_equal(np.asarray(Image.open(written)), np.asarray(images[1][0]))
