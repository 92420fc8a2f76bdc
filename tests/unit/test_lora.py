"""LoRA adapters (dalle_flax.training.lora): step 0 is the base model, only the adapters train
(the base is not even differentiated), rank and alpha matter, the merged export is the adapter
model, a resumed LoRA run continues exactly; adapter counts of the full-size mini / mega.

Run: ``python -m pytest tests/unit/test_lora.py -q``. Tiny models from test_training and the
bundled tiny pipeline with synthetic parquet written in ``tmp_path``; nothing from outside.
"""

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jax.sharding import PartitionSpec as P
from test_training import TINY_REPO, caption_batch, one_device, tiny_model

import dalle_flax
from dalle_flax import (
  DalleBartConfig,
  DalleMiniProcessor,
  FlaxDalleMiniForConditionalGeneration,
)
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params
from dalle_flax.training import TrainingArguments, train
from dalle_flax.training.checkpoint import Checkpoints
from dalle_flax.training.lora import (
  LoraSettings,
  apply_lora,
  init_lora,
  lora_targets,
  merge_lora,
)
from dalle_flax.training.optim import (
  OptimizerSettings,
  build_optimizer,
  weight_decay_mask,
)
from dalle_flax.training.step import (
  abstract_train_state,
  init_train_state,
  make_train_step,
  merged_params,
  shard_batch,
)

CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a yellow star"]
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"  # a whole pipeline folder


@pytest.fixture(scope="module")
def processor():
  return DalleMiniProcessor.from_pretrained(TINY_REPO)


def logits(model, params, batch):
  """Teacher-forced logits (b, n, v), deterministic, float32."""
  return np.asarray(jax.jit(lambda p: model.module.apply(
      {"params": p}, batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"]).logits)(params))


def adapter_count(adapters):
  return sum(x.size for x in jax.tree.leaves(adapters))


def random_adapters(params, rank, seed=0):
  """Adapters with nonzero A and B (init_lora's B is 0), drawn with numpy."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32),
                      init_lora(params, rank, jax.random.key(0)))


# --- the pure functions ----------------------------------------------------------------------------
@pytest.mark.parametrize("use_scan", [False, True])
def test_adapters_cover_the_attention_and_feed_forward_kernels(use_scan):
  model = tiny_model(use_scan=use_scan)
  flat = flatten_params(model.params)
  expected = {p for p in flat if p.endswith("/kernel") and p != "lm_head/kernel"}  # q/k/v/out, GLU Dense_0..2
  assert set(lora_targets(model.params)) == expected and len(expected) == (18 if use_scan else 29)
  adapters = flatten_params(init_lora(model.params, 4, jax.random.key(0)))
  assert set(adapters) == {f"{p}/{leaf}" for p in expected for leaf in ("lora_a", "lora_b")}
  dense_2 = next(p for p in expected if p.startswith("model/decoder/") and p.endswith("GLU_0/Dense_2/kernel"))
  lead = (2,) if use_scan else ()  # a scanned stack: one adapter pair per layer
  assert adapters[dense_2 + "/lora_a"].shape == (*lead, 24, 4) and adapters[dense_2 + "/lora_b"].shape == (*lead, 4, 16)
  assert not any(np.any(adapters[p + "/lora_b"]) for p in expected)  # B = 0
  a = np.concatenate([adapters[p + "/lora_a"].ravel() for p in expected if flat[p].shape[-2] == 16])
  assert 0.2 < a.std() < 0.3  # N(0, 1 / in) with in = 16


@pytest.mark.parametrize("use_scan", [False, True])
def test_step_0_is_exactly_the_base_model(processor, use_scan):
  model, batch = tiny_model(use_scan=use_scan), caption_batch(processor)
  base = logits(model, model.params, batch)
  adapters = init_lora(model.params, 4, jax.random.key(1))
  np.testing.assert_array_equal(logits(model, apply_lora(model.params, adapters, alpha=32.0), batch), base)
  moved = logits(model, apply_lora(model.params, random_adapters(model.params, 4)), batch)
  assert np.abs(moved - base).max() > 1e-2  # adapters with B != 0 do change the model


@pytest.mark.parametrize("use_scan", [False, True])
@pytest.mark.parametrize("rank, alpha", [(4, None), (4, 12.0), (2, 12.0)])
def test_apply_lora_adds_alpha_over_rank_times_a_b(use_scan, rank, alpha):
  model = tiny_model(use_scan=use_scan)
  adapters = random_adapters(model.params, rank)
  out, flat, flat_adapters = flatten_params(apply_lora(model.params, adapters, alpha)), flatten_params(
      model.params), flatten_params(adapters)
  scale = (alpha or rank) / rank
  for path, kernel in flat.items():
    if path not in lora_targets(model.params):
      assert out[path] is kernel, path  # untouched leaves are the same arrays
      continue
    a, b = (np.asarray(flat_adapters[f"{path}/{k}"], np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(out[path], np.asarray(kernel, np.float64) + scale * a @ b, rtol=1e-6, atol=1e-7)
  merged = merge_lora(model.params, adapters, alpha)  # the export's path: the same weights, the base's tree
  assert jax.tree.structure(merged) == jax.tree.structure(model.params)
  for path, value in flatten_params(merged).items():
    assert value.dtype == flat[path].dtype and value.shape == flat[path].shape
    np.testing.assert_allclose(value, out[path], rtol=0, atol=1e-7, err_msg=path)


def test_merge_keeps_each_kernels_dtype():
  model = tiny_model()
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.params)
  adapters = random_adapters(model.params, 2)
  merged = flatten_params(merge_lora(half, adapters))
  assert {v.dtype for v in merged.values()} == {jnp.dtype(jnp.bfloat16)}
  path, kernel = lora_targets(model.params)[0], flatten_params(half)[lora_targets(model.params)[0]]
  a, b = (np.asarray(flatten_params(adapters)[f"{path}/{k}"]) for k in ("lora_a", "lora_b"))
  expected = np.asarray(kernel, np.float32) + a @ b  # summed in float32, rounded once to bfloat16
  np.testing.assert_allclose(np.asarray(merged[path], np.float32), expected, rtol=1e-2, atol=1e-2)
  assert not np.array_equal(merged[path], kernel)


def test_adapters_that_do_not_fit_are_refused():
  unscanned, scanned = tiny_model(), tiny_model(use_scan=True)
  with pytest.raises(ValueError, match=r"have no kernel in the base parameters; build them with init_lora"):
    apply_lora(scanned.params, init_lora(unscanned.params, 2, jax.random.key(0)))
  wrong = flatten_params(init_lora(unscanned.params, 2, jax.random.key(0)))
  path = next(iter(wrong))
  wrong[path] = wrong[path][..., :1] if path.endswith("lora_a") else wrong[path][:1]
  with pytest.raises(ValueError, match=r"expected .* for the kernel \(16, \d+\); rebuild them with init_lora"):
    merge_lora(unscanned.params, unflatten_params(wrong))
  with pytest.raises(ValueError, match=r"no parameter path matches the LoRA targets"):
    init_lora({"lm_head": {"kernel": jnp.zeros((4, 4))}}, 2, jax.random.key(0))
  for bad in (0, 1.5, True):
    with pytest.raises(ValueError, match=r"LoRA rank must be an int >= 1, got"):
      LoraSettings(bad)


# --- the train step -------------------------------------------------------------------------------
def run_lora(model, lora, batches, settings=None, mesh=None):
  mesh = mesh or one_device()
  tx = build_optimizer(settings or OptimizerSettings(learning_rate=3e-2))
  state = init_train_state(model, model.params, tx, mesh, seed=0, lora=lora)
  step, losses = make_train_step(model, tx, mesh, lora=lora), []
  for batch in batches:
    state, metrics = step(state, shard_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


@pytest.mark.parametrize("use_scan", [False, True])
def test_only_the_adapters_train_and_the_loss_falls(processor, use_scan):
  model, lora = tiny_model(use_scan=use_scan), LoraSettings(4)
  before = flatten_params(jax.tree.map(np.array, model.params))
  settings = OptimizerSettings(learning_rate=3e-2, weight_decay=0.1)  # decay must not touch the base either
  state, losses = run_lora(model, lora, [caption_batch(processor, seed=i % 2) for i in range(10)], settings)
  assert losses[-1] < 0.9 * losses[0], losses
  for path, value in flatten_params(state.params).items():
    assert np.array_equal(value, before[path]), path  # the base is bit-identical
  assert all(np.any(b) for p, b in flatten_params(state.adapters).items() if p.endswith("lora_b"))
  # the optimizer state holds Adam's two moments of the adapters, nothing of the base
  kernels = {p: before[p].shape for p in lora_targets(model.params)}
  count = sum(lora.rank * (s[-2] + s[-1]) * math.prod(s[:-2]) for s in kernels.values())
  assert adapter_count(state.adapters) == count
  assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * count
  assert count < 0.2 * sum(x.size for x in before.values())  # rank 4 of d_model 16: still 15% of the model


def test_the_base_is_not_differentiated(processor):
  """The encoder's token-embedding gradient (a (1000, 16) scatter-add) exists only without LoRA."""
  model, mesh, batch = tiny_model(), one_device(), caption_batch(processor)
  tx, embedding_grad = build_optimizer(OptimizerSettings()), re.compile(r"f32\[1000,16\] = scatter-add")
  for lora, expected in ((None, True), (LoraSettings(2), False)):
    state = init_train_state(model, model.params, tx, mesh, lora=lora)
    jaxpr = str(jax.make_jaxpr(make_train_step(model, tx, mesh, lora=lora))(state, shard_batch(batch, mesh)))
    assert bool(embedding_grad.search(jaxpr)) is expected


def test_rank_and_alpha_change_the_training(processor):
  model, data = tiny_model(), [caption_batch(processor, seed=i) for i in range(3)]
  runs = {(r, a): run_lora(model, LoraSettings(r, a), data) for r, a in ((4, None), (2, None), (4, 16.0))}
  losses = {k: v[1] for k, v in runs.items()}
  assert len({v[0] for v in losses.values()}) == 1  # step 0 is the base model whatever the settings
  assert len({v[2] for v in losses.values()}) == 3, losses
  assert adapter_count(runs[(4, None)][0].adapters) == 2 * adapter_count(runs[(2, None)][0].adapters)


def test_weight_decay_reaches_the_adapters():
  adapters = init_lora(tiny_model().params, 2, jax.random.key(0))
  assert all(jax.tree.leaves(weight_decay_mask(adapters)))


def test_lora_state_checks():
  model, mesh, tx = tiny_model(), one_device(), build_optimizer(OptimizerSettings())
  with pytest.raises(ValueError, match=r"trainable='decoder' does not combine with LoRA"):
    make_train_step(model, tx, mesh, trainable="decoder", lora=LoraSettings(2))
  state = init_train_state(model, model.params, tx, mesh, lora=LoraSettings(2))
  with pytest.raises(ValueError, match=r"pass the LoraSettings it was trained with"):
    merged_params(state)
  abstract = abstract_train_state(model.params_shape_tree, tx, mesh, lora=LoraSettings(2))
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), state) == jax.tree.map(
      lambda a: (a.shape, a.dtype, a.sharding), abstract)
  assert {a.sharding.spec for a in jax.tree.leaves((state.adapters, state.opt_state))} == {P()}  # replicated


# --- full-size figures (shapes only) -----------------------------------------------------------------
# The released mini-1 / mega-1 configs' shape-determining keys (as in test_modeling_dalle_mini).
MINI_1 = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
              decoder_attention_heads=16, encoder_ffn_dim=2730, decoder_ffn_dim=2730, encoder_vocab_size=50264,
              image_vocab_size=16384, image_length=256, max_text_length=64, use_scan=True)
MEGA_1 = dict(MINI_1, d_model=2048, encoder_layers=24, decoder_layers=24, encoder_attention_heads=32,
              decoder_attention_heads=32, encoder_ffn_dim=4096, decoder_ffn_dim=4096, encoder_vocab_size=50272,
              image_vocab_size=16415)


@pytest.mark.parametrize("name, config, params, per_rank", [
    ("mini", MINI_1, 437_833_712, 565_200), ("mega", MEGA_1, 2_587_521_024, 2_064_384)])
def test_adapter_sizes_of_mini_and_mega(name, config, params, per_rank):
  shapes = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**config), _do_init=False).params_shape_tree
  assert sum(x.size for x in jax.tree.leaves(shapes)) == params
  tx = build_optimizer(OptimizerSettings())
  for rank in (8, 16):
    adapters = jax.eval_shape(lambda p, r=rank: init_lora(p, r, jax.random.key(0)), shapes)
    assert adapter_count(adapters) == rank * per_rank, name
    moments = [x for x in jax.tree.leaves(jax.eval_shape(tx.init, adapters)) if x.ndim]
    assert sum(x.size * x.dtype.itemsize for x in moments) == 2 * 4 * rank * per_rank


# --- end to end: train() on the bundled tiny pipeline -------------------------------------------------
def write_encoded(folder: Path, rows: int = 32, image_length: int = 16) -> Path:
  """Captions -> fixed code patterns (caption k: codes (k * 7 + i) % 64), two shards."""
  folder.mkdir(parents=True, exist_ok=True)
  captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(rows)]
  codes = [[(CAPTIONS.index(c) * 7 + i) % 64 for i in range(image_length)] for c in captions]
  for k, part in enumerate((slice(0, rows // 2), slice(rows // 2, rows))):
    table = pa.table({"caption": captions[part], "encoding": pa.array(codes[part], pa.list_(pa.int32()))})
    pq.write_table(table, folder / f"{k:05d}.parquet")
  return folder


def lora_arguments(root: Path, run: str, **overrides) -> TrainingArguments:
  settings = dict(model=str(TINY), train_data=str(write_encoded(root / "data")), output_dir=str(root / run),
                  train_batch_size=8, max_steps=12, learning_rate=1e-2, logging_steps=1, save_steps=4, seed=1,
                  blank_caption_prob=0.0, lora_rank=4, lora_alpha=8.0)
  return TrainingArguments(**{**settings, **overrides})



def read_metrics(run: Path):
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  return root, train(lora_arguments(root, "full", eval_data=str(root / "data"), eval_steps=12))


def test_lora_run_exports_the_merged_adapter_model(lora_run, processor):
  root, result = lora_run
  losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
  assert len(losses) == 12 and losses[-1] < 0.3 * losses[0], losses
  assert result.eval["eval_loss"] < 0.3 * losses[0]  # evaluated with the adapters merged
  card = (result.output_dir / "README.md").read_text()
  assert "| lora_rank | 4 |" in card and "| lora_alpha | 8.0 |" in card

  base_model = dalle_flax.pipeline("text-to-image", model=str(TINY)).model.text_model
  exported = dalle_flax.pipeline("text-to-image", model=str(result.output_dir)).model.text_model
  base, merged = flatten_params(base_model.params), flatten_params(exported.params)
  assert {p: (v.shape, v.dtype) for p, v in merged.items()} == {p: (v.shape, v.dtype) for p, v in base.items()}
  targets = set(lora_targets(base_model.params))
  for path in base:  # only the adapted kernels moved
    assert np.array_equal(merged[path], base[path]) != (path in targets), path

  lora, mesh = LoraSettings(4, 8.0), one_device()
  tx = build_optimizer(lora_arguments(root, "full").optimizer_settings())
  checkpoints = Checkpoints(result.output_dir / "checkpoints")
  state = checkpoints.restore(12, abstract_train_state(base_model.params_shape_tree, tx, mesh, lora=lora))
  checkpoints.close()
  for path, value in flatten_params(state.params).items():
    assert np.array_equal(value, base[path]), path  # the checkpoint's base is the untouched pretrained one
  batch = processor(CAPTIONS)
  batch["decoder_input_ids"] = np.tile(np.arange(16, dtype=np.int32) + 3, (4, 1))
  adapted = logits(base_model, apply_lora(state.params, state.adapters, lora.alpha), batch)
  np.testing.assert_allclose(logits(exported, exported.params, batch), adapted, atol=1e-5, rtol=0)
  assert np.abs(adapted - logits(base_model, base_model.params, batch)).max() > 1e-2


def test_resumed_lora_run_continues_the_losses_exactly(lora_run):
  root, full = lora_run
  expected = [m for m in read_metrics(full.output_dir) if "loss" in m]
  assert train(lora_arguments(root, "resumed", max_steps=8)).resumed_from is None
  second = train(lora_arguments(root, "resumed", max_steps=12))
  assert second.resumed_from == 8
  got = read_metrics(second.output_dir)
  assert [m["step"] for m in got] == list(range(1, 13))
  for want, have in zip(expected, got):
    assert (have["loss"], have["grad_norm"]) == (want["loss"], want["grad_norm"]), (want, have)
  with pytest.raises(ValueError, match=r"lora_rank: 4 -> 8"):
    train(lora_arguments(root, "resumed", max_steps=16, lora_rank=8))


@pytest.mark.parametrize("overrides, match", [
    ({"lora_rank": 0, "lora_alpha": 16.0}, r"lora_alpha=16.0 has no effect with lora_rank=0"),
    ({"lora_rank": -1}, r"lora_rank must be an int >= 0"),
    ({"lora_alpha": 0.0}, r"lora_alpha must be a number > 0 or None"),
    ({"trainable": "decoder"}, r"trainable='decoder' does not combine with lora_rank=4: .* leave trainable='all'"),
    ({"from_scratch": True}, r"drop from_scratch or set lora_rank=0"),
])
def test_lora_arguments_are_checked(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    lora_arguments(tmp_path, "run", **overrides)


def test_cli_flags(tmp_path, monkeypatch):
  from dalle_flax import cli, training

  seen = {}

  def fake_train(args):
    seen["args"] = args
    return training.TrainResult(Path(args.output_dir), args.max_steps, None, {"loss": 1.0})

  monkeypatch.setattr(training, "train", fake_train)
  assert cli.main(["train", "--model", "m", "--train-data", "d", "--output-dir", "o", "--lora-rank", "8",
                   "--lora-alpha", "16"]) == 0
  args = seen["args"]
  assert (args.lora_rank, args.lora_alpha, args.lora_settings()) == (8, 16.0, LoraSettings(8, 16.0))
  assert LoraSettings(8, 16.0).scale == 2.0 and LoraSettings(8).scale == 1.0
