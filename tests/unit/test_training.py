"""Training core: encoded-parquet batches (grain), optimizers and schedules, the train / eval steps.

Run: ``python -m pytest tests/unit/test_training.py -q`` (the 8-device check: ``-m slow``).
Tiny models and tiny synthetic parquet shards written in ``tmp_path``; nothing from outside.
"""

import copy
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dalle_flax import (
  DalleBartConfig,
  DalleBartTokenizer,
  DalleMiniProcessor,
  FlaxDalleMiniForConditionalGeneration,
)
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params
from dalle_flax.sharding import make_mesh
from dalle_flax.training.data import (
  load_encoded_rows,
  make_dataset,
  prepare_batch,
  shift_tokens_right,
)
from dalle_flax.training.optim import (
  OptimizerSettings,
  build_optimizer,
  learning_rate_schedule,
  trainable_mask,
)
from dalle_flax.training.step import (
  abstract_train_state,
  init_train_state,
  loss_and_accuracy,
  make_eval_step,
  make_train_step,
  shard_batch,
)

TINY_REPO = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"  # its tokenizer: 1000 ids
CAPTIONS = ["A Red Square", "a blue circle", "green lines", "Yellow dots"]
START = 20


def tiny_config(**overrides):
  settings = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 2, "encoder_attention_heads": 2,
              "decoder_attention_heads": 2, "encoder_ffn_dim": 24, "decoder_ffn_dim": 24, "encoder_vocab_size": 1000,
              "image_vocab_size": 20, "image_length": 8, "max_text_length": 16, "normalize_text": True,
              "decoder_start_token_id": START, "dropout": 0.0, "gradient_checkpointing": False,
              "use_scan": False}  # unscanned: compiles 2x faster
  return DalleBartConfig(**{**settings, **overrides})


def tiny_model(dtype=jnp.float32, **overrides):
  """Random parameters from numpy (an eager linen init costs seconds): norms 1 / 0, weights N(0, 0.05)."""
  model = FlaxDalleMiniForConditionalGeneration(tiny_config(**overrides), dtype=dtype, _do_init=False)
  rng = np.random.default_rng(0)
  init = {"scale": np.ones, "bias": np.zeros}
  noise = lambda shape: 0.05 * rng.standard_normal(shape)
  model.params = unflatten_params({path: jnp.asarray(init.get(path.split("/")[-1], noise)(leaf.shape), jnp.float32)
                                   for path, leaf in flatten_params(model.params_shape_tree).items()})
  return model


def pattern(k):  # caption k -> its fixed code pattern
  return (np.arange(8) * (k + 1) + 3 * k) % 20


def write_shard(path, captions, encodings, types=None):
  types = types or {"caption": pa.string(), "encoding": pa.list_(pa.int64())}
  columns = {"caption": captions, "encoding": encodings}
  pq.write_table(pa.table({k: pa.array(v, types[k]) for k, v in columns.items() if k in types}), path)
  return path


def numbered_shards(folder, rows, files=2):
  """rows whose codes spell their row id (row i: [i % 20, i // 20, ...]), over ``files`` files."""
  folder.mkdir(exist_ok=True)
  encodings = [[i % 20, i // 20] + [1] * 6 for i in range(rows)]
  for f, chunk in enumerate(np.array_split(np.arange(rows), files)):
    write_shard(folder / f"{f:03d}.parquet", [f"row {i}" for i in chunk], [encodings[i] for i in chunk])
  return folder


def row_ids(batch):
  return [int(a) + 20 * int(b) for a, b in batch["labels"][:, :2]]


@pytest.fixture(scope="module")
def processor():
  return DalleMiniProcessor.from_pretrained(TINY_REPO)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
  return numbered_shards(tmp_path_factory.mktemp("numbered"), 24)


def batches(rows, processor, n, **kwargs):
  iterator = iter(make_dataset(rows, processor, tiny_config(), **{"batch_size": 4, **kwargs}))
  return [next(iterator) for _ in range(n)]


# --- data -------------------------------------------------------------------------------------
def test_batches_follow_the_original_semantics(tmp_path, processor):
  encodings = [pattern(k).tolist() for k in range(4)]
  rows = load_encoded_rows(write_shard(tmp_path / "a.parquet", CAPTIONS, encodings), tiny_config())
  batch = batches(rows, processor, 1, blank_caption_prob=0.0, shuffle=False)[0]
  expected = processor(CAPTIONS)  # normalized, tokenized to max_text_length
  np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
  raw = processor.tokenizer(CAPTIONS, padding="max_length", max_length=16, return_tensors="np")["input_ids"]
  assert (batch["input_ids"] != raw).any()  # normalization did something
  np.testing.assert_array_equal(batch["labels"], encodings)
  np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], START)
  np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], np.asarray(encodings)[:, :-1])
  assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}
  np.testing.assert_array_equal(shift_tokens_right(np.array([[5, 6, 7]]), 9), [[9, 5, 6]])


def test_seed_determines_order_and_each_epoch_reshuffles(numbered, processor):
  rows = load_encoded_rows(numbered, tiny_config())
  first = [row_ids(b) for b in batches(rows, processor, 12, seed=3)]
  assert first == [row_ids(b) for b in batches(rows, processor, 12, seed=3)]
  assert first != [row_ids(b) for b in batches(rows, processor, 12, seed=4)]
  epochs = [list(itertools.chain(*first[e * 6:(e + 1) * 6])) for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))  # every row once per epoch
  assert epochs[0] != epochs[1] and epochs[0] != list(range(24))
  in_order = [row_ids(b) for b in batches(rows, processor, 6, shuffle=False)]
  assert list(itertools.chain(*in_order)) == list(range(24))


def test_rows_are_sharded_by_process(tmp_path, processor):
  folder = numbered_shards(tmp_path / "odd", 25, files=3)
  shares = [load_encoded_rows(folder, tiny_config(), process_index=i, process_count=2) for i in range(2)]
  assert [len(s) for s in shares] == [12, 12] and shares[0].total_rows == 25  # row 24 dropped
  assert set(shares[0].row_ids) | set(shares[1].row_ids) == set(range(24))
  assert not set(shares[0].row_ids) & set(shares[1].row_ids)
  seen = [{r for b in batches(s, processor, 3) for r in row_ids(b)} for s in shares]
  assert seen == [set(s.row_ids) for s in shares]
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
    load_encoded_rows(folder, tiny_config(), process_index=2, process_count=2)


def test_process_slices_of_global_batches_equal_one_process(numbered, processor):
  rows = load_encoded_rows(numbered, tiny_config())
  kwargs = {"seed": 3, "blank_caption_prob": 0.5, "batch_size": 3}
  one = batches(rows, processor, 5, **{**kwargs, "batch_size": 6})  # crosses an epoch (4 batches of 6)
  parts = [batches(rows, processor, 5, process_slice=(i, 2), **kwargs) for i in range(2)]
  for whole, first, second in zip(one, *parts):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
  with pytest.raises(ValueError, match="process_slice must be"):
    batches(rows, processor, 1, process_slice=(2, 2), **kwargs)


def test_restored_iterator_state_gives_exactly_the_next_batches(numbered, processor):
  rows = load_encoded_rows(numbered, tiny_config())
  kwargs = {"seed": 5, "blank_caption_prob": 0.5, "batch_size": 5}  # 4 batches per epoch: cross one
  iterator = iter(make_dataset(rows, processor, tiny_config(), **kwargs))
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # plain JSON, as grain's checkpointer writes
  expected = [next(iterator) for _ in range(4)]
  restored = iter(make_dataset(load_encoded_rows(numbered, tiny_config()), processor, tiny_config(), **kwargs))
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])


def blanked(batch_list, processor):
  empty = processor.tokenizer([""], padding="max_length", max_length=16, return_tensors="np")["input_ids"][0]
  return [r for b in batch_list for r, ids in zip(row_ids(b), b["input_ids"]) if (ids == empty).all()]


def test_blank_caption_probability(numbered, processor):
  rows = load_encoded_rows(numbered, tiny_config())
  assert len(blanked(batches(rows, processor, 6, blank_caption_prob=1.0), processor)) == 24
  assert blanked(batches(rows, processor, 6, blank_caption_prob=0.0), processor) == []
  half = blanked(batches(rows, processor, 60, blank_caption_prob=0.5), processor)  # 10 epochs
  assert 80 <= len(half) <= 160
  assert half == blanked(batches(rows, processor, 60, blank_caption_prob=0.5), processor)
  assert sorted(half) != sorted(blanked(batches(rows, processor, 60, blank_caption_prob=0.5, seed=1), processor))
  per_epoch = [set(blanked(batches(rows, processor, 12, blank_caption_prob=0.5)[e * 6:(e + 1) * 6], processor))
               for e in range(2)]
  assert per_epoch[0] != per_epoch[1]  # drawn again each epoch
  by_default = blanked(batches(rows, processor, 60), processor)  # default 0.1
  assert 5 <= len(by_default) <= 50


ROW = [1] * 8
ERRORS = [  # (captions, encodings, types, match)
    (["a"], [ROW], {"caption": pa.string()}, r"bad\.parquet: missing column\(s\) \['encoding'\]"),
    ([], [], None, r"the dataset is empty: 0 rows"),
    (["a", "b"], [ROW, [1] * 7], None, r"bad\.parquet: row 1: 'encoding' has 7 codes, expected config\.image_length="),
    (["a", "b"], [ROW, ROW[:7] + [20]], None, r"row 1: code 20 at position 7 is outside \[0, config"),
    (["a"], [[-1] + ROW[1:]], None, r"row 0: code -1 at position 0 is outside"),
    (["a", "b"], [ROW, None], None, r"row 1: 'encoding' is null"),
    (["a", None], [ROW, ROW], None, r"row 1: 'caption' is null"),
    ([1], [ROW], {"caption": pa.int64(), "encoding": pa.list_(pa.int64())}, r"'caption' must hold strings, got int64"),
    (["a"], [["x"] * 8], {"caption": pa.string(), "encoding": pa.list_(pa.string())}, r"lists of integers"),
]


@pytest.mark.parametrize("captions, encodings, types, match", ERRORS)
def test_validation_errors_name_file_row_expected_and_got(tmp_path, captions, encodings, types, match):
  path = write_shard(tmp_path / "bad.parquet", captions, encodings, types)
  with pytest.raises(ValueError, match=match):
    load_encoded_rows(path, tiny_config())


def test_files_and_arguments_are_checked(tmp_path, numbered, processor):
  assert len(load_encoded_rows(str(numbered / "*.parquet"), tiny_config())) == 24
  assert len(load_encoded_rows([numbered / "001.parquet", numbered / "000.parquet"], tiny_config())) == 24
  with pytest.raises(FileNotFoundError, match="no parquet file found for"):
    load_encoded_rows(tmp_path / "nothing-*.parquet", tiny_config())
  (tmp_path / "text.parquet").write_text("not parquet")
  with pytest.raises(ValueError, match=r"text\.parquet: not a readable parquet file"):
    load_encoded_rows(tmp_path / "text.parquet", tiny_config())
  renamed = tmp_path / "renamed.parquet"
  pq.write_table(pa.table({"text": ["a"], "codes": [ROW]}), renamed)
  assert load_encoded_rows(renamed, tiny_config(), caption_column="text", encoding_column="codes").captions == ["a"]
  rows = load_encoded_rows(numbered, tiny_config())
  sizes = lambda **kwargs: [len(b["labels"]) for b in itertools.islice(make_dataset(  # islice: never hang
      rows, processor, tiny_config(), batch_size=5, **kwargs), 10)]
  assert sizes(num_epochs=1, drop_remainder=False) == [5, 5, 5, 5, 4] and sizes(num_epochs=2) == [5] * 8
  for kwargs, match in [({"batch_size": 25}, r"batch_size must be in \[1, 24\]"),
                        ({"blank_caption_prob": 1.5}, "blank_caption_prob must be in"),
                        ({"config": tiny_config(max_text_length=12)}, "processor.max_text_length is 16 but config")]:
    with pytest.raises(ValueError, match=match):
      make_dataset(rows, processor, kwargs.pop("config", tiny_config()), **{"batch_size": 4, **kwargs})


def test_a_tokenizer_without_its_vocabulary_is_refused_before_training(numbered, processor):
  """transformers 5's RobertaTokenizer ignores 4.x's vocab_file=: every caption -> <s> </s>."""
  empty = copy.copy(processor)
  empty.tokenizer = DalleBartTokenizer()  # the five special tokens and nothing else
  rows = load_encoded_rows(numbered, tiny_config())
  with pytest.raises(ValueError, match=r"every caption into special tokens only \(e\.g\. ' row 0' -> "
                                       r"\['<s>', '</s>'\]\); its vocabulary holds 5 entries"):
    make_dataset(rows, processor=empty, config=tiny_config(), batch_size=4)
  make_dataset(rows, processor, tiny_config(), batch_size=4)  # the real vocabulary passes


# --- optimizers and schedules -------------------------------------------------------------------
@pytest.mark.parametrize("settings, expected", [  # {update: learning rate}
    ({"warmup_steps": 4}, {0: 0.0, 2: 0.5, 4: 1.0, 100: 1.0}),
    ({"warmup_steps": 2, "schedule": "linear", "decay_steps": 4, "end_learning_rate": 0.2},
     {1: 0.5, 2: 1.0, 4: 0.6, 6: 0.2, 9: 0.2}),
    ({"schedule": "cosine", "decay_steps": 4, "end_learning_rate": 0.2}, {0: 1.0, 2: 0.6, 4: 0.2, 8: 0.2}),
    ({"warmup_steps": 2, "schedule": "exponential", "decay_rate": 0.5, "transition_steps": 2},
     {2: 1.0, 3: 2 ** -0.5, 6: 0.25}),
    ({"schedule": "exponential", "decay_rate": 0.5, "transition_steps": 2, "staircase": True}, {1: 1.0, 3: 0.5}),
])
def test_schedule_values(settings, expected):
  schedule = learning_rate_schedule(OptimizerSettings(learning_rate=1.0, **settings))
  assert {k: round(float(schedule(k)), 6) for k in expected} == pytest.approx(expected)


def fake_params():
  rng = np.random.default_rng(0)
  shapes = {"model/encoder/embed_tokens/embedding": (5, 4), "model/encoder/layers/q_proj/kernel": (4, 4),
            "model/decoder/layers/LayerNorm_0/scale": (4,), "model/decoder/layers/LayerNorm_0/bias": (4,),
            "model/decoder/embed_tokens/embedding": (6, 4), "model/decoder/layers/out_proj/kernel": (2, 4, 4),
            "lm_head/kernel": (4, 6)}
  return unflatten_params({k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()})


def test_adamw_is_clipped_masked_adamw_step_by_step():
  settings = OptimizerSettings(learning_rate=0.1, beta1=0.5, beta2=0.8, eps=1e-2, weight_decay=0.3, max_grad_norm=0.5)
  params, tx = fake_params(), build_optimizer(settings)
  state, rng = tx.init(params), np.random.default_rng(1)
  flat = {k: np.asarray(v, np.float64) for k, v in flatten_params(params).items()}
  m, v = ({k: 0.0 for k in flat} for _ in range(2))
  for t in range(1, 4):
    grads = {k: rng.standard_normal(x.shape) for k, x in flat.items()}
    updates, state = jax.jit(tx.update)(unflatten_params({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}),
                                        state, params)
    params = optax.apply_updates(params, updates)
    norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
    for k, g in grads.items():  # the textbook AdamW after global-norm clipping, weight decay on kernels only
      g = g * min(1.0, 0.5 / norm)
      m[k], v[k] = 0.5 * m[k] + 0.5 * g, 0.8 * v[k] + 0.2 * g * g
      step = (m[k] / (1 - 0.5 ** t)) / (np.sqrt(v[k] / (1 - 0.8 ** t)) + 1e-2)
      flat[k] = flat[k] - 0.1 * (step + (0.3 * flat[k] if k.endswith("kernel") else 0.0))
  for k, value in flatten_params(params).items():
    np.testing.assert_allclose(value, flat[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_weight_decay_touches_kernels_only(optimizer):
  params = fake_params()
  tx = build_optimizer(OptimizerSettings(optimizer=optimizer, learning_rate=0.1, weight_decay=0.5))
  state = tx.init(params)
  assert ("FactoredState" in str(jax.tree.structure(state))) == (optimizer == "adafactor")
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)  # zero grads: decay only
  for path, update in flatten_params(updates).items():
    expected = -0.05 * flatten_params(params)[path] if path.endswith("kernel") else 0.0
    np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=path)


def test_settings_are_checked():
  for kwargs, match in [({"optimizer": "shampoo"}, "optimizer must be one of"), ({"schedule": "linear"}, "decay_steps"),
                        ({"trainable": "lora"}, "trainable must be one of"), ({"max_grad_norm": 0}, "max_grad_norm"),
                        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps")]:
    with pytest.raises(ValueError, match=match):
      OptimizerSettings(**kwargs)


# --- steps ----------------------------------------------------------------------------------------
def caption_batch(processor, n=8, seed=0):
  ks = np.random.default_rng(seed).integers(0, 4, n)
  return prepare_batch([CAPTIONS[k] for k in ks], np.stack([pattern(k) for k in ks]), processor, START)


def one_device():
  return make_mesh(devices=jax.devices()[:1])


def train(step, state, batch_list, mesh):
  metrics = []
  for batch in batch_list:
    state, m = step(state, shard_batch(batch, mesh))
    metrics.append(jax.device_get(m))
  return state, metrics


def run(model, settings, batch_list, mesh=None, trainable=None):
  mesh, tx = mesh or one_device(), build_optimizer(settings)
  step = make_train_step(model, tx, mesh, trainable=trainable or settings.trainable)
  return train(step, init_train_state(model, model.params, tx, mesh, seed=0), batch_list, mesh)


@pytest.fixture(scope="module")
def reference(processor):
  """30 AdamW steps of the fp32 tiny model on captions -> fixed patterns (one compile, shared)."""
  model, data = tiny_model(), [caption_batch(processor, seed=i) for i in range(30)]
  state, metrics = run(model, OptimizerSettings(learning_rate=1e-2), data)
  return model, data, state, metrics


def test_loss_matches_one_hot_cross_entropy():
  logits = (jax.random.normal(jax.random.key(0), (2, 3, 21)) * 3).astype(jnp.bfloat16)
  labels = jnp.array([[0, 20, 5], [7, 7, 1]])
  loss, accuracy = jax.jit(loss_and_accuracy)(logits, labels)
  expected = optax.softmax_cross_entropy(logits.astype(jnp.float32), jax.nn.one_hot(labels, 21)).mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert accuracy == (jnp.argmax(logits, -1) == labels).mean()


def test_loss_falls_on_captions_to_fixed_patterns(reference, processor):
  model, data, state, metrics = reference
  losses = [float(m["loss"]) for m in metrics]
  assert losses[-1] < 0.3 * losses[0] and metrics[-1]["accuracy"] > 0.8, losses
  assert int(state.step) == 30
  evaluated = make_eval_step(model, one_device())(state.params, caption_batch(processor, seed=99))
  assert float(evaluated["loss"]) < 0.3 * losses[0]
  # Adafactor's steps are relative to each parameter's scale, hence a larger learning rate
  _, adafactor = run(model, OptimizerSettings(optimizer="adafactor", learning_rate=0.3), data[:8])
  assert adafactor[-1]["loss"] < 0.75 * adafactor[0]["loss"], [float(m["loss"]) for m in adafactor]


def test_accumulating_4_micro_batches_equals_one_4x_batch(processor):
  model, big = tiny_model(), caption_batch(processor, n=16)
  micro = [{k: v[i * 4:(i + 1) * 4] for k, v in big.items()} for i in range(4)]
  # eps=1e-3: Adam's first step is lr * sign(g) where |g| << eps, which rounding can flip
  settings = OptimizerSettings(learning_rate=1e-2, eps=1e-3, weight_decay=0.1, max_grad_norm=0.5)
  accumulated, _ = run(model, OptimizerSettings(**{**settings.__dict__, "gradient_accumulation_steps": 4}), micro)
  one, _ = run(model, settings, [big])
  changed = jax.tree.map(lambda a, b: np.abs(a - b).max(), one.params, model.params)
  assert max(jax.tree.leaves(changed)) > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated.params, one.params)


@pytest.mark.parametrize("trainable, step_trainable", [("decoder", None), ("embeddings", None), ("all", "decoder")])
def test_frozen_parameters_do_not_change(reference, trainable, step_trainable):
  model, data, _, everything = reference
  state, metrics = run(model, OptimizerSettings(learning_rate=1e-2, weight_decay=0.1, trainable=trainable),
                       data[:2], trainable=step_trainable)
  mask = flatten_params(trainable_mask(model.params, step_trainable or trainable))
  before, after = flatten_params(model.params), flatten_params(state.params)
  for path, trains in mask.items():
    assert np.array_equal(before[path], after[path]) != trains, path
  if step_trainable is None:  # frozen parameters hold no optimizer state
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * sum(before[p].size for p, t in mask.items() if t)
  if trainable == "embeddings":
    assert {p.split("/")[-2] for p, t in mask.items() if t} == {"lm_head", "embed_positions", "embed_tokens",
                                                                "final_ln", "layernorm_embedding"}
    assert not any(p.startswith("model/encoder") for p, t in mask.items() if t)
  assert metrics[0]["grad_norm"] < everything[0]["grad_norm"]  # counts trained parameters only


def test_dropout_key_is_folded_with_the_step(processor):
  model, mesh = tiny_model(dropout=0.3), one_device()
  tx = build_optimizer(OptimizerSettings(learning_rate=0.0))
  step, batch = make_train_step(model, tx, mesh), shard_batch(caption_batch(processor), mesh)
  start = init_train_state(model, model.params, tx, mesh, seed=0)
  loss = lambda state: float(step(state, batch)[1]["loss"])
  fresh = lambda seed=0, at=0: jax.tree.map(jnp.copy, start).replace(  # a copy: the step donates its state
      step=jnp.int32(at), key=jax.random.key_data(jax.random.key(seed)))
  assert loss(fresh()) == loss(fresh())  # the same key and step: the same masks
  assert len({loss(fresh()), loss(fresh(at=1)), loss(fresh(seed=1))}) == 3
  clean = float(make_eval_step(model, mesh)(fresh().params, batch)["loss"])
  assert clean != loss(fresh())  # dropout is on in train mode


@pytest.mark.parametrize("use_scan", [False, True])
def test_remat_follows_gradient_checkpointing(processor, use_scan):
  batch, mesh, tx = caption_batch(processor), one_device(), build_optimizer(OptimizerSettings())
  for checkpointing in (False, True):
    model = tiny_model(gradient_checkpointing=checkpointing, use_scan=use_scan)
    state = init_train_state(model, model.params, tx, mesh)
    assert ("remat" in str(jax.make_jaxpr(make_train_step(model, tx, mesh))(state, batch))) is checkpointing


def test_bfloat16_compute_keeps_float32_params_and_evaluates_in_float32(reference):
  fp32, data, _, m32 = reference
  bf16 = FlaxDalleMiniForConditionalGeneration(fp32.config, params=fp32.params, dtype=jnp.bfloat16)
  state16, m16 = run(bf16, OptimizerSettings(learning_rate=1e-2), data[:1])
  assert {x.dtype for x in jax.tree.leaves(state16.params)} == {jnp.dtype(jnp.float32)}
  assert 0 < abs(m16[0]["loss"] - m32[0]["loss"]) < 2e-2
  mesh = one_device()
  assert make_eval_step(bf16, mesh)(fp32.params, data[0]) == make_eval_step(fp32, mesh)(fp32.params, data[0])


def test_init_state_and_its_abstract_twin(processor):
  model, mesh = tiny_model(), one_device()
  tx = build_optimizer(OptimizerSettings(gradient_accumulation_steps=2, trainable="decoder"))
  half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.params)
  state = init_train_state(model, half, tx, mesh, seed=7)
  assert int(state.step) == 0 and {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(state.key, jax.random.key_data(jax.random.key(7)))
  abstract = abstract_train_state(model.params_shape_tree, tx, mesh)
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), state) == jax.tree.map(
      lambda a: (a.shape, a.dtype, a.sharding), abstract)
  scratch = init_train_state(model, None, tx, mesh, seed=1)
  assert jax.tree.structure(scratch) == jax.tree.structure(state)
  assert not np.array_equal(scratch.params["lm_head"]["kernel"], state.params["lm_head"]["kernel"])
  batch = {k: v for k, v in caption_batch(processor).items() if k != "labels"}
  with pytest.raises(ValueError, match=r"batch lacks \['labels'\]"):
    make_train_step(model, tx, mesh)(state, batch)


def test_resume_from_an_orbax_checkpoint_gives_the_same_losses(tmp_path, numbered, processor):
  """The state (with accumulation and frozen parts) and the iterator saved together; the original
  once dropped its optimizer state on resume (PR #71), so compare the losses that follow."""
  model, mesh, config = tiny_model(), one_device(), tiny_config()
  tx = build_optimizer(OptimizerSettings(learning_rate=1e-2, gradient_accumulation_steps=2, trainable="decoder"))
  step = make_train_step(model, tx, mesh, trainable="decoder")
  dataset = make_dataset(load_encoded_rows(numbered, config), processor, config, batch_size=4)
  losses = lambda state, batches: [float(m["loss"]) for m in train(step, state, itertools.islice(batches, 3), mesh)[1]]
  iterator = iter(dataset)
  state, _ = train(step, init_train_state(model, model.params, tx, mesh), itertools.islice(iterator, 3), mesh)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected, resumed_iterator = losses(state, iterator), iter(dataset)
  restored = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_train_state(model.params_shape_tree, tx, mesh)),
      data=grain.checkpoint.CheckpointRestore(resumed_iterator)))
  manager.close()
  assert int(restored["state"].step) == 3 and losses(restored["state"], resumed_iterator) == expected


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_training import tiny_model, caption_batch, run, TINY_REPO
    from dalle_flax.training.step import make_eval_step, shard_batch
    from dalle_flax import DalleMiniProcessor
    from dalle_flax.sharding import make_mesh
    from dalle_flax.training.optim import OptimizerSettings
    assert jax.device_count() == 8, jax.devices()
    processor, model = DalleMiniProcessor.from_pretrained(TINY_REPO), tiny_model(use_scan=True)
    data = [caption_batch(processor, n=8, seed=i) for i in range(3)]
    settings = OptimizerSettings(learning_rate=1e-2, weight_decay=0.1)
    out = {}
    meshes = {"one": make_mesh(devices=jax.devices()[:1]), "dp8": make_mesh(dp=8), "dp4mp2": make_mesh(dp=4, mp=2)}
    for name, mesh in meshes.items():
      state, metrics = run(model, settings, data, mesh)
      mu = state.opt_state[1][0].mu["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]["GLU_0"]["Dense_2"]["kernel"]
      evaluated = make_eval_step(model, mesh)(state.params, shard_batch(data[0], mesh))
      out[name] = {"losses": [float(m["loss"]) for m in metrics] + [float(evaluated["loss"])],
                   "mu_spec": str(mu.sharding.spec),
                   "lm_head": np.asarray(state.params["lm_head"]["kernel"]).tolist()}
    try:
      run(model, settings, [caption_batch(processor, n=6)], make_mesh(dp=8))
    except ValueError as error:
      out["error"] = str(error)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_three_steps_on_8_simulated_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent)], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  for name in ("dp8", "dp4mp2"):
    np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], atol=1e-5)  # 3 train steps, then eval
    np.testing.assert_allclose(out[name]["lm_head"], out["one"]["lm_head"], atol=1e-5)
  assert out["one"]["losses"][2] < out["one"]["losses"][0]
  assert "mp" in out["dp4mp2"]["mu_spec"]  # Adam moments sharded like their parameter
  assert "not divisible by the mesh's dp=8" in out["error"]
