"""Train step: frozen parameters stay bitwise unchanged with no optimizer state, gradient
accumulation equals one big batch, and sharded steps match one device."""

import jax
import numpy as np
import pytest

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.data import pipeline
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train import state as state_lib
from lavi_jax.train import step as step_lib
from tests.helpers import tiny_config


def _batch(model, batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, model.llm.vocab_size, (batch, length)).astype(np.int32)
  ids[:, 2] = model.image_token_id
  text_mask = np.arange(length)[None] < rng.integers(8, length + 1, (batch, 1))
  side = model.vision.image_size
  return dict(
      input_ids=ids, text_mask=text_mask,
      targets=np.roll(ids, -1, axis=1), loss_mask=text_mask & (np.arange(length)[None] > 4),
      images=dict(pixel_values=rng.uniform(-1, 1, (batch, 1, side, side, 3)).astype(np.float32),
                  frame_mask=np.ones((batch, 1), bool), frame_item=np.zeros((batch, 1), np.int32)))


def _run(config, mesh, stage_index=0, steps=3, batches=None):
  stage = opt_lib.stages(config.train)[stage_index]
  state, _ = state_lib.create(config, stage, mesh, jax.random.key(0))
  trainable, _ = opt_lib.split(state.params, stage.config.trainable)
  tx = opt_lib.make_optimizer(stage, config.train, trainable)
  step_fn = jax.jit(step_lib.make_train_step(config, stage, tx))
  losses = []
  initial = jax.device_get(state.params)
  for i in range(steps):
    batch = batches[i] if batches else _batch(config.model, seed=i)
    batch = jax.device_put(batch, sharding.data_sharding(mesh))
    with sharding.activate(mesh, config.mesh):
      state, metrics = step_fn(state, batch)
    losses.append(float(metrics['loss']))
  return initial, state, losses


def _two_stage_config():
  """tiny, with the base config's stages: align (bridge only), then finetune (+ LLM)."""
  config = tiny_config()
  config.train.stage_order = ('align', 'finetune')
  config.train.stages = lavi_config.base_config().train.stages
  return config


def _one_device_mesh(config):
  config.mesh.update(data=1, fsdp=1, tensor=1, rules='fsdp')
  return sharding.make_mesh(config.mesh, jax.devices()[:1])


@pytest.mark.parametrize('stage_index', [0, 1])
def test_frozen_parameters_are_unchanged_and_have_no_optimizer_state(stage_index):
  config = _two_stage_config()
  stage = opt_lib.stages(config.train)[stage_index]
  initial, state, losses = _run(config, _one_device_mesh(config), stage_index)
  before, after = opt_lib.flatten(initial), opt_lib.flatten(jax.device_get(state.params))
  trainable, frozen = opt_lib.split(initial, stage.config.trainable)
  for path in frozen:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert any(not np.array_equal(after[p], before[p]) for p in trainable)
  # Optimizer moments exist exactly for the trainable parameters.
  moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
             if hasattr(s, 'mu')]
  assert moments and all(set(m.mu) == set(trainable) for m in moments)
  assert all(np.isfinite(losses))


def test_gradient_accumulation_equals_one_big_batch():
  config = tiny_config()
  mesh = _one_device_mesh(config)
  batches = [_batch(config.model, seed=i) for i in range(2)]
  _, whole, whole_losses = _run(config, mesh, steps=2, batches=batches)
  config.train.accumulation_steps = 4
  _, accumulated, acc_losses = _run(config, mesh, steps=2, batches=batches)
  np.testing.assert_allclose(acc_losses, whole_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(accumulated.params)),
                  jax.tree.leaves(jax.device_get(whole.params))):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('shape,rules', [((8, 1, 1), 'fsdp'), ((2, 2, 2), 'fsdp_tp')])
def test_sharded_training_matches_one_device(shape, rules):
  config = _two_stage_config()
  _, single, single_losses = _run(config, _one_device_mesh(config), stage_index=1)
  config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2], rules=rules)
  _, sharded, sharded_losses = _run(config, sharding.make_mesh(config.mesh), stage_index=1)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)),
                  jax.tree.leaves(jax.device_get(single.params))):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_accumulation_under_fsdp_with_frame_pools_equals_one_device():
  """Pipeline batches (frame pools of 16 groups: one per device and micro-batch) on 8 devices
  with 2 accumulation steps train as one device does on the whole batch."""
  config = tiny_config()
  config.data.update(num_workers=0, read_threads=0, train_mixture='synthetic:train:64')
  config.data.synthetic.video_fraction = 0.5
  data = iter(pipeline.make_dataset(config, groups=16))
  batches = [next(data) for _ in range(2)]
  assert batches[0]['visual']['frame_video'].any()
  _, single, single_losses = _run(config, _one_device_mesh(config), steps=2, batches=batches)
  config.mesh.update(data=2, fsdp=4, tensor=1, rules='fsdp')
  config.train.accumulation_steps = 2
  assert lavi_config.validate(config, num_devices=8) == 16
  _, sharded, sharded_losses = _run(config, sharding.make_mesh(config.mesh), steps=2,
                                    batches=batches)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(sharded.params)),
                  jax.tree.leaves(jax.device_get(single.params))):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_micro_batches_keep_each_device_on_its_own_rows():
  rows = np.arange(16)
  split = step_lib.micro_batches({'rows': rows}, steps=2, shards=4)['rows']
  # Device d holds rows 4d..4d+3; micro-batch k takes its rows 4d+2k, 4d+2k+1.
  np.testing.assert_array_equal(split, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])


def test_stage_configuration_errors_name_the_stage():
  config = _two_stage_config()
  config.train.stage_order = ('align', 'pretrain')
  with pytest.raises(ValueError, match="'pretrain'"):
    opt_lib.stages(config.train)
  config = tiny_config()
  params = {'llm': {'norm': {'scale': np.ones(3)}}}
  with pytest.raises(ValueError, match='matches no parameter'):
    opt_lib.split(params, '^vit/')
