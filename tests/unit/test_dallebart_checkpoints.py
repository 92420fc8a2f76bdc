"""DalleBart checkpoints: msgpack-origin and safetensors round trips, layouts, Hub push/pull."""

import json
from pathlib import Path

import numpy as np
import pytest

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.convert import unscan_params
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=100,
            image_vocab_size=24, decoder_start_token_id=24, bos_token_id=25, eos_token_id=25,
            pad_token_id=25, image_length=16, max_text_length=8, gradient_checkpointing=False)


def same(a, b):
  fa, fb = flatten_params(a), flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert fa[key].dtype == fb[key].dtype, key
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


@pytest.fixture(scope="module")
def legacy_folder():
  folder = FIXTURES / "dallebart-mini-like"
  if not folder.is_dir():
    pytest.skip(f"golden fixtures not found at {folder}")
  return folder


@pytest.mark.parametrize("max_shard_size", ["10GB", "200KB"])
def test_msgpack_origin_save_load_bit_exact(tmp_path, legacy_folder, max_shard_size):
  original = FlaxDalleMiniForConditionalGeneration.from_pretrained(legacy_folder)
  original.save_pretrained(tmp_path, max_shard_size=max_shard_size)
  names = {p.name for p in tmp_path.iterdir()}
  assert "generation_config.json" in names and "config.json" in names
  assert ("model.safetensors.index.json" in names) == (max_shard_size == "200KB")
  reloaded = FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)
  same(reloaded.params, original.params)
  assert reloaded.config.to_dict() == original.config.to_dict() | {"architectures": reloaded.config.architectures}
  assert reloaded.generation_config.to_diff_dict() == original.generation_config.to_diff_dict()


def test_layouts_convert_both_ways_through_disk(tmp_path, legacy_folder):
  scanned = FlaxDalleMiniForConditionalGeneration.from_pretrained(legacy_folder)
  unrolled = FlaxDalleMiniForConditionalGeneration.from_pretrained(legacy_folder, use_scan=False)
  assert "FlaxBartDecoderLayer_1" in str(flatten_params(unrolled.params).keys())
  same(unrolled.params, unflatten_params(unscan_params(flatten_params(scanned.params))))
  unrolled.save_pretrained(tmp_path / "unrolled")
  back = FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path / "unrolled", use_scan=True)
  same(back.params, scanned.params)


def test_push_to_hub_then_load_by_repo_id(local_hub, legacy_folder):
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(legacy_folder)
  model.push_to_hub("tester/tiny-dalle")
  files = set(local_hub.api.list_repo_files("tester/tiny-dalle"))
  assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= files
  card = Path(local_hub.api.hf_hub_download("tester/tiny-dalle", "README.md")).read_text()
  assert "library_name: dalle-flax" in card and "pipeline_tag: text-to-image" in card
  pulled = FlaxDalleMiniForConditionalGeneration.from_pretrained("tester/tiny-dalle")
  same(pulled.params, model.params)
  # offline, from the cache
  with local_hub.offline():
    cached = FlaxDalleMiniForConditionalGeneration.from_pretrained("tester/tiny-dalle")
  same(cached.params, model.params)


def test_legacy_msgpack_uploaded_to_hub_loads_by_revision(local_hub, legacy_folder):
  api = local_hub.api
  api.create_repo("tester/legacy")
  api.upload_folder(repo_id="tester/legacy", folder_path=str(legacy_folder), allow_patterns=["*.json", "*.msgpack"])
  sha = api.model_info("tester/legacy").sha
  api.upload_file(repo_id="tester/legacy", path_or_fileobj=b"{}", path_in_repo="config.json")  # break main
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained("tester/legacy", revision=sha)
  same(model.params, FlaxDalleMiniForConditionalGeneration.from_pretrained(legacy_folder).params)


def test_mismatched_checkpoint_lists_all_problems(tmp_path):
  model = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**TINY, use_scan=False), seed=0)
  model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["decoder_layers"] = 3
  config["d_model"] = 64
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError) as err:
    FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)
  message = str(err.value)
  assert "missing parameter(s)" in message and "wrong shape" in message and "model.safetensors" in message
  assert message.count("\n") > 10  # every problem listed, not only the first


def test_bad_ln_positions_and_types_in_config_json(tmp_path):
  model = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**TINY), seed=0)
  model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "ln_positions": "sandwich"}))
  with pytest.raises(Exception, match="ln_positions"):
    FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": "1024"}))
  with pytest.raises(Exception, match="d_model"):
    FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)


def test_text_model_loads_from_a_single_folder_pipeline():
  folder = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(folder)
  assert model.config.model_type == "dallebart" and model.config.image_vocab_size == 64
  assert model.generation_config.suppress_tokens == [64]
