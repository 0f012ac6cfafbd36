"""Training math: weight decay by parameter name (the same for scanned and unscanned layers),
float32 counts and means in the conditioners, a bfloat16 train step, the zero-init property in
bfloat16, and float32 accumulation of the visual memory's gradient over the modulated norms."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.models import LaVi, abstract_params
from lavi_jax.models.attention import Mask
from lavi_jax.models.lavi import count_items_so_far
from lavi_jax.models.viln import token_conditioning
from lavi_jax.train import optimizer as opt_lib
from lavi_jax.train import state as state_lib
from lavi_jax.train import step as step_lib
from tests.helpers import random_images, random_params, tiny_config

# Layer-free names: 'llm/layers_3/...' (unscanned) and 'llm/layers/layer_0/...' (scanned) alike.
_LAYER = re.compile(r'layers_\d+|layers/layer_\d+')


def _decayed_by_the_optimizer(model) -> dict[str, bool]:
  """{layer-free path: decayed}, from one AdamW step with zero gradients (only the decay moves
  a parameter then), every parameter trainable."""
  config = tiny_config()
  config.train.weight_decay = 0.5
  config.train.stages = dict(train=dict(steps=10, trainable='.*', learning_rate=1.0,
                                        warmup_steps=0, lr_scale=''))
  stage = opt_lib.stages(config.train)[0]
  params = {k: jnp.ones(v.shape, v.dtype)
            for k, v in opt_lib.flatten(abstract_params(model)).items()}
  tx = opt_lib.make_optimizer(stage, config.train, params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  out = {}
  for path, update in updates.items():
    decayed = bool(np.any(np.asarray(update) != 0))
    assert out.setdefault(_LAYER.sub('layers', path), decayed) == decayed, path
  return out


@pytest.mark.parametrize('overrides', [
    {},
    {'viln.conditioner': 'conv', 'viln.gate': 'tanh', 'viln.kv_groups': 2,
     'llm.tie_word_embeddings': False},
])
def test_weight_decay_by_name_is_the_same_scanned_and_unscanned(overrides):
  small = {'llm.num_layers': 2, 'vision.num_layers': 1, **overrides}
  unscanned = _decayed_by_the_optimizer(tiny_config(**small, scan_layers=False).model)
  scanned = _decayed_by_the_optimizer(tiny_config(**small, scan_layers=True).model)
  assert scanned == unscanned
  for path, decayed in unscanned.items():
    name = path.rpartition('/')[2]
    assert decayed == (name.endswith('kernel') or name.endswith('embedding')), path
  # What the names cover: matrices and embedding tables decay; scales, biases and gates do not.
  assert unscanned['llm/embed_tokens/embedding'] and unscanned['vit/position_embedding']
  assert unscanned['frame_index/embedding'] and unscanned['vit/patch_embedding/kernel']
  assert not unscanned['llm/layers/input_layernorm/scale']
  assert not unscanned['llm/layers/self_attn/q_proj/bias'] and not unscanned['llm/norm/scale']
  if overrides:
    assert unscanned['llm/lm_head/kernel']
    assert not unscanned['llm/layers/post_attention_layernorm/conditioner/gate']
    assert unscanned['viln_context/conv_mixer/depthwise_kernel']
    assert not unscanned['viln_context/conv_mixer/depthwise_bias']
    assert not unscanned['viln_context/conv_mixer/norm1/scale']


def test_weight_decay_names_cover_the_7b_model():
  flat = opt_lib.flatten(abstract_params(lavi_config.load_config_file('configs/7b.py').model))
  decayed = {path for path in flat if opt_lib.decays(path)}
  assert 'llm/layers/layer_0/input_layernorm/scale' not in decayed  # stacked: (28, 3584)
  assert 'llm/layers/layer_0/self_attn/k_proj/bias' not in decayed  # (28, 4, 128)
  assert 'llm/layers/layer_0/input_layernorm/conditioner/o_proj/bias' not in decayed
  assert 'llm/layers/layer_0/input_layernorm/conditioner/o_proj/kernel' in decayed
  assert 'llm/lm_head/kernel' in decayed and 'llm/embed_tokens/embedding' in decayed
  with pytest.raises(ValueError, match='llm/extra/alpha'):
    opt_lib.decays('llm/extra/alpha')


def test_bfloat16_visual_summary_counts_and_means_in_float32():
  n, valid = 7300, 7290  # 7,290 visual tokens: a bfloat16 count would be 7,296
  tokens = np.zeros((1, n, 2), np.float32)
  tokens[0, 0, 0] = 1  # channel 0: mean 1 / 7290; channel 1: mean 1
  tokens[0, :, 1] = 1
  memory = {'mask': jnp.asarray(np.arange(n)[None] < valid), 'item': jnp.zeros((1, n), jnp.int32),
            'tokens': jnp.asarray(tokens, jnp.bfloat16)}
  cond = token_conditioning(memory, jnp.asarray([[0, 1]]))  # token 0 sees no item, token 1 one
  summary = np.asarray(cond['summary'])
  assert cond['summary'].dtype == jnp.float32
  np.testing.assert_array_equal(summary[0, 0, 0], [0, 0])
  np.testing.assert_allclose(summary[0, 0, 1], [1 / valid, 1], rtol=1e-7)


def _tiny_bf16(**overrides):
  """tiny in bfloat16, smaller still: 2 LLM layers, 1 ViT layer."""
  config = tiny_config(**{'dtype': 'bfloat16', 'llm.num_layers': 2, 'vision.num_layers': 1,
                          **overrides})
  config.mesh.update(data=1, fsdp=1, tensor=1, rules='fsdp')
  return config


def test_bfloat16_train_step_loss_is_finite_and_falls():
  config = _tiny_bf16(scan_layers=True)
  config.train.stages = dict(train=dict(steps=50, trainable='.*', learning_rate=3e-3,
                                        warmup_steps=5, lr_scale=''))
  stage = opt_lib.stages(config.train)[0]
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = state_lib.create(config, stage, mesh, jax.random.key(0))
  trainable, _ = opt_lib.split(state.params, stage.config.trainable)
  step_fn = jax.jit(step_lib.make_train_step(
      config, stage, opt_lib.make_optimizer(stage, config.train, trainable)))
  model = config.model
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 40, (4, 16)).astype(np.int32)
  ids[:, 2] = model.image_token_id
  side = model.vision.image_size
  batch = jax.device_put(dict(
      input_ids=ids, text_mask=np.ones((4, 16), bool), targets=np.roll(ids, -1, axis=1),
      loss_mask=np.arange(16)[None].repeat(4, 0) > 2,
      images=dict(pixel_values=rng.uniform(-1, 1, (4, 1, side, side, 3)).astype(np.float32))),
      sharding.data_sharding(mesh))
  losses = []
  with sharding.activate(mesh, config.mesh):
    for _ in range(50):
      state, metrics = step_fn(state, batch)
      losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


@pytest.mark.parametrize('overrides', [
    {'scan_layers': True, 'viln.sublayers': ('attn', 'mlp', 'final')},
    {'viln.conditioner': 'conv', 'viln.kv_groups': 2, 'viln.delta_clip': 0.5},
    {'viln.gate': 'tanh', 'attention': 'blockwise', 'scan_layers': True},
])
def test_zero_initialised_lavi_is_the_base_llm_in_bfloat16(overrides):
  """A pretrained LLM (random weights, norm scales away from 1) with zero-initialised
  conditioners (the last projections zero, or the tanh gates closed)."""
  model = _tiny_bf16(**overrides).model
  zero = ('gate',) if model.viln.gate == 'tanh' else ('o_proj', 'fc2')

  def zero_init(path, leaf):
    keys = [str(getattr(k, 'key', k)) for k in path]
    return jnp.zeros_like(leaf) if 'conditioner' in keys and set(zero) & set(keys) else leaf

  params = jax.tree_util.tree_map_with_path(zero_init, random_params(model, scale=0.1))
  apply = jax.jit(lambda p, **kw: LaVi(model).apply({'params': p}, **kw))
  ids = jax.random.randint(jax.random.key(1), (2, 12), 3, model.llm.vocab_size)
  ids = ids.at[:, 4].set(model.image_token_id)
  base = np.asarray(apply(params, input_ids=ids))  # no visual input: plain RMSNorms throughout
  lavi = np.asarray(apply(params, input_ids=ids, images=random_images(model, 2, 2, 2)))
  np.testing.assert_array_equal(lavi, base)


@pytest.mark.parametrize('kind,scan', [('attention', True), ('mlp', False)])
def test_visual_memory_gradient_accumulates_in_float32(kind, scan):
  """In bfloat16, the gradient of the visual memory that all modulated norms read equals the
  float32 sum of each norm's own gradient (given each layer its own copy of the memory, through
  one conditioner group per layer). Summed in bfloat16, as before, the difference was 2e-3 to
  5e-3 of the largest value with 4 layers; in float32 it is below 1e-8."""
  layers = 4
  model = _tiny_bf16(**{'viln.conditioner': kind, 'scan_layers': scan, 'llm.num_layers': layers,
                        'llm.hidden_size': 64, 'llm.intermediate_size': 128}).model
  params = random_params(model)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 3, model.llm.vocab_size)
  ids = ids.at[:, 3].set(model.image_token_id)
  images = random_images(model, 2, 1, 2)
  cond = jax.jit(lambda p: LaVi(model).apply(
      {'params': p}, images, ids,
      method=lambda m, im, i: m.conditioning(m.encode_visual(im), count_items_so_far(i, m.cfg))))(
          params)
  names = ('k', 'v') if kind == 'attention' else ('summary',)

  def memory_grads(model, cond):
    def loss(memory):
      def run(m, c, i):
        b, t = i.shape
        return m.llm(i, jnp.broadcast_to(jnp.arange(t), (b, t)),
                     Mask.causal_padded(jnp.ones((b, t), bool)), c)
      logits = LaVi(model).apply({'params': params}, {**cond, **memory}, ids, method=run)
      return jax.nn.log_softmax(logits).mean()
    return jax.jit(jax.grad(loss))({name: cond[name] for name in names})

  per_layer_model = copy.deepcopy(model)
  per_layer_model.viln.kv_groups = layers  # layer l reads group l
  copies = {name: jnp.tile(cond[name], (layers,) + (1,) * (cond[name].ndim - 1)) for name in names}
  per_layer = memory_grads(per_layer_model, {**cond, **copies})
  shared = memory_grads(model, cond)
  for name in names:
    expected = np.asarray(per_layer[name], np.float64).sum(0)
    actual = np.asarray(shared[name], np.float64)[0]
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.abs(expected).max(), err_msg=name)
