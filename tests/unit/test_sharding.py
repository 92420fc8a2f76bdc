"""Partition rules, and generation with parameters sharded over 8 simulated CPU devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jax.sharding import PartitionSpec as P

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.modeling_flax_utils import flatten_params
from dalle_flax.sharding import partition_specs

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"


def test_rules_cover_the_real_mini_tree():
  config = DalleBartConfig(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_ffn_dim=2730,
                           decoder_ffn_dim=2730, image_vocab_size=16384)
  model = FlaxDalleMiniForConditionalGeneration(config, _do_init=False)
  specs = flatten_params(partition_specs(model.params_shape_tree, mp_size=2))
  assert specs["model/encoder/embed_tokens/embedding"] == P("mp", None)
  layers = "model/decoder/layers/FlaxBartDecoderLayers"
  assert specs[f"{layers}/FlaxBartAttention_0/q_proj/kernel"] == P(None, None, "mp")
  assert specs[f"{layers}/FlaxBartAttention_1/out_proj/kernel"] == P(None, "mp", None)
  assert specs[f"{layers}/GLU_0/Dense_2/kernel"] == P(None, "mp", None)
  assert specs[f"{layers}/LayerNorm_1/scale"] == P(None, None)
  # mini's 16385 image rows do not divide by 2 (nor by 8): replicated rather than an error ...
  assert specs["lm_head/kernel"] == P(None, None)
  assert specs["model/decoder/embed_tokens/embedding"] == P(None, None)
  # ... which is why mega pads its image vocabulary to 16416 = 8 * 2052
  mega = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(d_model=64, encoder_layers=1, decoder_layers=1,
                                                               image_vocab_size=16415), _do_init=False)
  mega_specs = flatten_params(partition_specs(mega.params_shape_tree, mp_size=8))
  assert mega_specs["lm_head/kernel"] == P(None, "mp")
  assert mega_specs["model/decoder/embed_tokens/embedding"] == P("mp", None)


def test_unknown_parameter_is_an_error():
  with pytest.raises(ValueError, match="No partition rule matches parameter 'mystery/weight'"):
    partition_specs({"mystery": {"weight": __import__("numpy").zeros((2, 2))}})


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from dalle_flax import FlaxDalleMiniForConditionalGeneration, kernels
    from dalle_flax.sharding import make_mesh, shard_params, batch_sharding
    folder = sys.argv[1]
    assert jax.device_count() == 8, jax.devices()
    model = FlaxDalleMiniForConditionalGeneration.from_pretrained(folder)
    ids = np.load(folder + "/expected/generate.npz")["input_ids"]
    ids = np.concatenate([ids] * 4)                          # 8 prompts
    mask = (ids != 1).astype(np.int32)
    kwargs = dict(seed=3, guidance_scale=3.0, top_k=8, temperature=1.3)
    single = np.asarray(model.generate(ids, mask, **kwargs).sequences)
    mesh = make_mesh(dp=2, mp=4)
    params = shard_params(model.params, mesh)
    ids_s = jax.device_put(ids, batch_sharding(mesh))
    mask_s = jax.device_put(mask, batch_sharding(mesh))
    sharded = model.generate(ids_s, mask_s, params=params, **kwargs).sequences
    kinds = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)})
    steps = {name: model.decoding(p).native for name, p in (("single", model.params), ("sharded", params))}
    print(json.dumps({"same": bool((np.asarray(sharded) == single).all()), "specs": kinds, "steps": steps,
                      "kernel": kernels.kernels_available()}))
""")


@pytest.mark.slow
def test_generate_on_8_simulated_devices_matches_one_device(tmp_path):
  folder = FIXTURES / "dallebart-mini-like"
  if not folder.is_dir():
    pytest.skip(f"golden fixtures not found at {folder}")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["same"]
  assert any("mp" in spec for spec in result["specs"])  # really sharded, not only replicated
  # one device runs the native CPU matmul (when it builds); sharded parameters never do
  assert result["steps"]["sharded"] is False
  assert result["steps"]["single"] is result["kernel"]
