"""Sharded forward passes on 8 fake CPU devices equal one device; fsdp shards big params."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lavi_jax import config as lavi_config
from lavi_jax import dry_run, sharding
from lavi_jax.models import LaVi, init_params
from tests.helpers import perturb, random_images, tiny_config


def _inputs(model):
  ids = jax.random.randint(jax.random.key(1), (8, 16), 3, model.llm.vocab_size)
  ids = ids.at[:, 4].set(model.image_token_id)
  text_mask = jnp.arange(16)[None, :] < jnp.array([16, 12, 9, 16, 5, 16, 14, 10])[:, None]
  return dict(input_ids=ids, text_mask=text_mask, images=random_images(model, 8, 2, 2))


@pytest.fixture(scope='module')
def reference():
  config = tiny_config()
  model = config.model
  params = perturb(nn.unbox(init_params(model, jax.random.key(0))))
  logits = jax.jit(lambda p, x: LaVi(model).apply({'params': p}, **x))(params, _inputs(model))
  return config, params, np.asarray(logits)


@pytest.mark.parametrize('shape,rules', [((8, 1, 1), 'fsdp'), ((1, 8, 1), 'fsdp'),
                                         ((2, 2, 2), 'fsdp_tp'), ((1, 4, 2), 'fsdp_tp')])
def test_sharded_forward_equals_one_device(reference, shape, rules):
  config, params, expected = reference
  assert jax.device_count() == 8
  config.mesh.update(data=shape[0], fsdp=shape[1], tensor=shape[2], rules=rules)
  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config.mesh)
  model = config.model
  # Parameters are born sharded; then the reference values are placed onto those shardings.
  born, shardings = sharding.init_sharded(functools.partial(init_params, model), mesh, axis_rules,
                                          jax.random.key(0))
  born_sharded = [not x.sharding.is_fully_replicated for x in jax.tree.leaves(born)]
  assert any(born_sharded) == (shape[0] < 8)  # with data parallelism only, all are replicated
  params = jax.device_put(params, shardings)
  inputs = jax.device_put(_inputs(model), sharding.data_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    logits = jax.jit(lambda p, x: LaVi(model).apply({'params': p}, **x))(params, inputs)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize('config_file', ['configs/0_5b.py', 'configs/7b.py'])
def test_fsdp_leaves_no_large_parameter_replicated(config_file):
  config = lavi_config.load_config_file(config_file)
  config.mesh.update(data=1, fsdp=8, tensor=1, rules='fsdp')
  mesh = sharding.make_mesh(config.mesh)
  abstract = dry_run.abstract_params(config.model)
  shardings = sharding.logical_shardings(abstract, mesh, sharding.rules(config.mesh))
  replicated = [
      jax.tree_util.keystr(path)
      for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(abstract)),
                                 jax.tree.leaves(nn.unbox(shardings)))
      if math.prod(leaf.shape) * leaf.dtype.itemsize > 2**20 and s.is_fully_replicated]
  assert not replicated


def test_mesh_validation_names_the_problem():
  config = tiny_config()
  config.mesh.update(data=3, fsdp=-1, tensor=1)
  with pytest.raises(ValueError, match='not divisible'):
    sharding.resolve_mesh_shape(config.mesh, 8)
  config.mesh.update(data=2, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match='needs 4 devices, but 8'):
    sharding.resolve_mesh_shape(config.mesh, 8)
  config.mesh.update(data=1, fsdp=4, tensor=2, rules='fsdp')
  with pytest.raises(ValueError, match='fsdp_tp'):
    sharding.resolve_mesh_shape(config.mesh, 8)


@pytest.mark.parametrize('shape,spec,expected', [
    ((1152, 1024), P('fsdp', None), P(None, 'fsdp')),  # 1152 = 2^7 x 9: to the 1024 axis
    ((2048, 1152), P(None, 'fsdp'), P('fsdp', None)),
    ((1152, 16, 72), P('fsdp', None, None), P(None, None, None)),  # divides none: replicated
    ((4304, 1152), P('tensor', 'fsdp'), P('tensor', None)),  # 4304 takes tensor, not 1024 more
    ((4096, 6), P('fsdp', 'tensor'), P(('fsdp', 'tensor'), None)),  # joins fsdp's dimension
    ((1152, 64), P(('data', 'fsdp'), None), P('data', None)),  # keeps the axis that divides
    ((6, 1024, 768), P(None, 'data', None), P(None, None, 'data')),  # the largest it divides
    ((512, 1024, 768), P('fsdp', None, None), P('fsdp', None, None)),  # divides: unchanged
])
def test_fit_spec_moves_axes_that_do_not_divide(shape, spec, expected):
  sizes = {'data': 3, 'fsdp': 256, 'tensor': 4}
  assert sharding.fit_spec(shape, spec, sizes) == expected


def test_indivisible_parameters_init_sharded_and_dry_run_agrees():
  # A 36-wide ViT on fsdp=8: its 'vis_embed' axes do not divide, so they give fsdp to another
  # axis (fc1 (36, 256) -> 256) or replicate (position_embedding (9, 36)).
  config = tiny_config(**{'vision.hidden_size': 36})
  config.mesh.update(data=1, fsdp=8, tensor=1, rules='fsdp')
  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config.mesh)
  init_fn = functools.partial(init_params, config.model)
  params, shardings = sharding.init_sharded(init_fn, mesh, axis_rules, jax.random.key(0))
  vit = params['vit']
  assert vit['layers_0']['mlp']['fc1']['kernel'].sharding.spec == P(None, 'fsdp')
  assert vit['position_embedding'].sharding.is_fully_replicated
  for leaf, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    assert leaf.sharding == s
    assert all(size % math.prod(mesh.shape[a] for a in axes) == 0
               for size, axes in zip(leaf.shape, sharding._dims(s.spec, leaf.ndim)))
  held = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  assert sharding.per_device_bytes(abstract, axis_rules, (1, 8, 1)) == held
