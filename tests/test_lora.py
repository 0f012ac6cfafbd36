"""LoRA / QLoRA stages: zero adapters keep the base model, only adapters and named parameters
train, merged weights equal base + adapters, checkpoints carry the adapters, int8 bases."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.convert import to_torch
from lavi_jax.models import LaVi
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import lora as lora_lib
from lavi_jax.train import loop
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train import state as state_lib
from lavi_jax.train import step as step_lib
from tests.helpers import random_params, tiny_config

SCANNED = {'scan_layers': True}


def _batch(model, batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, model.llm.vocab_size, (batch, length)).astype(np.int32)
  ids[:, 2] = model.image_token_id
  text_mask = np.ones((batch, length), bool)
  side = model.vision.image_size
  return dict(
      input_ids=ids, text_mask=text_mask, targets=np.roll(ids, -1, axis=1),
      loss_mask=text_mask & (np.arange(length)[None] > 2),
      images=dict(pixel_values=rng.uniform(-1, 1, (batch, 1, side, side, 3)).astype(np.float32),
                  frame_mask=np.ones((batch, 1), bool), frame_item=np.zeros((batch, 1), np.int32)))


def _logits(model, params, batch):
  return LaVi(model).apply({'params': params}, **step_lib.model_inputs(batch))


def _lora_config(quantize='none', **model_overrides):
  """tiny (float32), one stage: LoRA rank 4 on the LLM projections, the bridge trained fully."""
  config = tiny_config(**model_overrides)
  config.train.stages.train.update(trainable=lavi_config.ALIGN_PARAMS, warmup_steps=1,
                                   learning_rate=1e-2, lr_scale='')
  config.train.stages.train.lora = lavi_config.lora_config(rank=4, alpha=8.0, quantize=quantize)
  config.mesh.update(data=1, fsdp=1, tensor=1, rules='fsdp')
  return config


def _random_adapters(params, spec, seed=1):
  """`params` with every adapter (B included) random, so the adapters change the model."""
  rng = np.random.default_rng(seed)
  flat = opt_lib.flatten(params)
  for path in flat:
    if path.startswith('lora/') and path.endswith('_kernel'):
      flat[path] = jnp.asarray(rng.normal(0, 0.1, flat[path].shape), flat[path].dtype)
  return opt_lib.unflatten(flat)


@pytest.mark.parametrize('overrides', [{}, SCANNED])
def test_zero_adapters_give_the_base_logits(overrides):
  config = _lora_config(**overrides)
  spec = lora_lib.of_stage(config.train.stages.train)
  params = random_params(config.model)
  attached = lora_lib.attach(params, spec, jax.random.key(0))
  flat = opt_lib.flatten(attached)
  adapters = [p for p in flat if p.startswith('lora/')]
  # q, k, v, o, gate, up, down of every layer (scanned: of the one stacked block).
  layers = 1 if overrides else config.model.llm.num_layers
  assert len(adapters) == 2 * 7 * layers
  batch = _batch(config.model)
  np.testing.assert_array_equal(_logits(config.model, lora_lib.merge(attached, spec), batch),
                                _logits(config.model, params, batch))


@pytest.mark.parametrize('overrides', [{}, SCANNED])
def test_merged_kernel_equals_base_plus_adapter_path(overrides):
  """x . merge(W) == x . W + alpha/r (x A) B for each target (one- and two-axis inputs, and
  a stacked scan axis), float32 to 1e-5; and the merged model's logits differ from the base."""
  config = _lora_config(**overrides)
  spec = lora_lib.of_stage(config.train.stages.train)
  params = random_params(config.model)
  attached = _random_adapters(lora_lib.attach(params, spec, jax.random.key(0)), spec)
  flat, merged = opt_lib.flatten(attached), opt_lib.flatten(lora_lib.merge(attached, spec))
  rng = np.random.default_rng(0)
  for path in lora_lib.targets(opt_lib.flatten(params), spec):
    lead, n_in, _ = lora_lib._axes(path, flat[path].ndim)
    w = flat[path]
    stacked, ins = w.shape[:lead], w.shape[lead:lead + n_in]
    x = rng.normal(size=stacked + (3,) + ins).astype(np.float32)
    contract = ((tuple(range(lead + 1, x.ndim)), tuple(range(lead, lead + n_in))),
                (tuple(range(lead)), tuple(range(lead))))
    y_merged = jax.lax.dot_general(x, merged[path], contract)
    a, b = flat[f'lora/{path}/a_kernel'], flat[f'lora/{path}/b_kernel']
    x_flat = x.reshape(stacked + (3, -1))
    adapter = jnp.matmul(jnp.matmul(x_flat, a), b).reshape(y_merged.shape)
    y_unmerged = jax.lax.dot_general(x, w, contract) + spec.scaling * adapter
    np.testing.assert_allclose(y_merged, y_unmerged, atol=1e-5, rtol=1e-5, err_msg=path)
  batch = _batch(config.model)
  assert not np.allclose(_logits(config.model, opt_lib.unflatten(merged), batch),
                         _logits(config.model, params, batch), atol=1e-3)


def _train(config, steps):
  stage = opt_lib.stages(config.train)[0]
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = state_lib.create(config, stage, mesh, jax.random.key(0))
  step_fn, _ = loop.jit_train_step(config, stage, mesh, loop.make_param_shardings(config, mesh))
  initial, losses = jax.device_get(state.params), []
  for i in range(steps):
    batch = jax.device_put(_batch(config.model, seed=i % 2), sharding.data_sharding(mesh))
    with sharding.activate(mesh, config.mesh):
      state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
  return initial, state, losses


def test_only_adapters_and_named_parameters_train():
  config = _lora_config(**SCANNED)
  initial, state, losses = _train(config, 3)
  before, after = opt_lib.flatten(initial), opt_lib.flatten(jax.device_get(state.params))
  trainable, frozen = opt_lib.split(initial, lora_lib.trainable_regex(config.train.stages.train))
  assert {p for p in trainable if p.startswith('lora/')} == {p for p in before
                                                              if p.startswith('lora/')}
  assert not any(p.startswith('llm/') and '/conditioner/' not in p for p in trainable)
  assert any(p.startswith('projector/') for p in trainable)
  for path in frozen:  # the targets and everything unnamed: bitwise unchanged
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  for path in trainable:
    if path.endswith('b_kernel'):
      assert not np.array_equal(after[path], before[path]), path
  moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
             if hasattr(s, 'mu')]
  assert moments and all(set(m.mu) == set(trainable) for m in moments)
  assert all(np.isfinite(losses))
  # The analytic FLOPs count the LLM's weight gradients (the step forms them for the targets).
  assert loop.llm_trained(state.params, opt_lib.stages(config.train)[0])


def test_qlora_int8_base_is_close_and_trains():
  config = _lora_config(quantize='int8', **SCANNED)
  spec = lora_lib.of_stage(config.train.stages.train)
  params = random_params(config.model)
  attached = lora_lib.attach(params, spec, jax.random.key(0))
  flat = opt_lib.flatten(attached)
  targets = lora_lib.targets(opt_lib.flatten(params), spec)
  assert all(flat[p].dtype == jnp.int8 for p in targets)
  batch = _batch(config.model)
  base = _logits(config.model, params, batch)
  quantized = _logits(config.model, lora_lib.merge(attached, spec), batch)
  # Per-channel absmax int8 rounds each weight by up to scale / 2 = max|W| / 254, uniformly:
  # with weights ~ N(0, 0.05) (max ~ 4 sigma) an RMS error of ~0.5% of max|W|, ~1% of the
  # weights' spread; through the 4 layers that is ~2% of the logits' spread (measured 2.2%).
  error = np.sqrt(np.mean((quantized - base) ** 2)) / np.std(base)
  assert 0 < error < 0.05, error
  _, state, losses = _train(config, 4)
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  after = opt_lib.flatten(jax.device_get(state.params))
  assert all(after[p].dtype == np.int8 for p in targets)


def test_checkpoint_keeps_adapters_and_load_params_merges(tmp_path):
  """align (no LoRA), then a LoRA finetune: resuming restores the adapters exactly, and
  load_params (generation, evaluation) gives the merged weights."""
  config = _lora_config(**SCANNED)
  config.mesh.fsdp = -1  # the adapters sharded as their bases over all (8) devices
  config.train.stage_order = ('align', 'train')
  config.train.stages.align = dict(steps=2, trainable=lavi_config.ALIGN_PARAMS,
                                   learning_rate=1e-3, warmup_steps=1, lr_scale='')
  config.train.stages.train.steps = 3
  config.data.update(batch_size=8, max_text_len=48)
  config.checkpoint.update(every=100, async_save=False)
  config.train.log_every = 1
  trainer = loop.Trainer(config, str(tmp_path))
  assert trainer.run() == 5
  trained = jax.device_get(trainer.state.params)
  trainer.checkpointer.close()
  assert any(k.startswith('lora/') for k in opt_lib.flatten(trained))

  resumed = loop.Trainer(config, str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params), trained)
  resumed.checkpointer.close()

  _, loaded = ckpt_lib.load_params(str(tmp_path))
  spec = lora_lib.of_stage(config.train.stages.train)
  expected = jax.device_get(lora_lib.merge(trained, spec))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), loaded, expected)
  # The export reads the merged weights too (a group at a time, adapters beside their targets).
  source = to_torch.Source(str(tmp_path))
  source.check()
  exported = source.read(source.shapes)
  flat_expected = flax.traverse_util.flatten_dict(expected)
  assert set(exported) == set(flat_expected)
  adapted = sorted(source.adapted)  # the LLM's attention and MLP projections
  assert {p[-2] for p in adapted} == {f'{x}_proj' for x in 'qkvo'} | {
      'gate_proj', 'up_proj', 'down_proj'}, adapted
  for path, value in exported.items():
    np.testing.assert_allclose(value, flat_expected[path], atol=1e-6, err_msg=str(path))
  base = flax.traverse_util.flatten_dict(trained)[adapted[0]]  # the frozen kernel alone
  assert np.abs(exported[adapted[0]] - base).max() > 1e-4


def test_lora_config_errors_name_the_key():
  config = _lora_config()
  config.train.stages.train.lora.rank = -1
  with pytest.raises(lavi_config.ConfigError, match=r'train\.stages\.train\.lora\.rank'):
    lavi_config.validate(config, num_devices=1)
  config = _lora_config()
  config.train.stages.train.lora.quantize = 'nf4'
  with pytest.raises(lavi_config.ConfigError, match=r'lora\.quantize'):
    lavi_config.validate(config, num_devices=1)
  config = _lora_config()
  config.train.stages.train.lora.targets = 'conditioner/.*/bias'
  with pytest.raises(ValueError, match='only dense kernels'):
    lora_lib.attach(random_params(config.model), lora_lib.of_stage(config.train.stages.train),
                    jax.random.key(0))


def test_recipes_carry_a_lora_section_that_flags_turn_on():
  """Every stage of the recipes has `lora` (rank 0: off), so --config.train.stages.NAME.lora.*
  flags can turn it on."""
  for path in ('configs/tiny.py', 'configs/7b.py'):
    config = lavi_config.load_config_file(path)
    for name, stage in config.train.stages.items():
      assert lora_lib.of_stage(stage) is None, (path, name)
      stage.lora.update(rank=64, quantize='int8')
      lavi_config.validate_lora(name, stage.lora)
      assert lora_lib.of_stage(stage) == lora_lib.Lora(lavi_config.LLM_PROJECTIONS, 64, 128.0,
                                                       'int8')


def test_next_stage_starts_from_the_merged_weights():
  """A LoRA stage followed by a full one: the adapters are merged in and dropped."""
  config = _lora_config(**SCANNED)
  config.train.stage_order = ('train', 'full')
  config.train.stages.full = dict(steps=2, trainable='.*', learning_rate=1e-3, warmup_steps=1,
                                  lr_scale='')
  lora_stage, full_stage = opt_lib.stages(config.train)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, param_shardings = state_lib.create(config, lora_stage, mesh, jax.random.key(0))
  spec = lora_lib.of_stage(lora_stage.config)
  state = state.replace(params=_random_adapters(state.params, spec))
  expected = jax.device_get(lora_lib.merge(state.params, spec))
  state = state_lib.with_stage_optimizer(state, config, full_stage, mesh, param_shardings,
                                         previous=lora_stage)
  assert 'lora' not in state.params
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), expected)
