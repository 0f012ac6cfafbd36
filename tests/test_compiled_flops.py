"""Matmul FLOPs read from optimised HLO (lavi_jax.compiled_flops) against counts made by hand:
loops (a scan, XLA's windowed einsums) count their trip count, batched and grouped einsums (TPU
convolutions with padded, dilated windows) their valid taps only."""
# pylint: disable=redefined-outer-name

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lavi_jax import compile as compile_lib
from lavi_jax.compiled_flops import UnknownTripCount, matmul_flops

LAYERS, ROWS, WIDTH = 6, 256, 512


@pytest.fixture(scope='module')
def mesh():
  devices = compile_lib.topology_devices(compile_lib.parse_topology('v5e:2x2'))
  return Mesh(np.array(devices), ('fsdp',))


def _layer(x, w):
  return jnp.dot(jax.nn.gelu(jnp.dot(x, w[0])), w[1]), None


def _loss(weights, x):
  y, _ = jax.lax.scan(jax.checkpoint(_layer), x, weights)
  return jnp.mean(jnp.square(y.astype(jnp.float32)))


@pytest.mark.parametrize('platform', ['tpu', 'cpu'])
def test_a_scanned_rematerialised_stack_counts_every_layer(mesh, platform):
  weights = jax.ShapeDtypeStruct((LAYERS, 2, WIDTH, WIDTH), jnp.bfloat16)
  x = jax.ShapeDtypeStruct((ROWS, WIDTH), jnp.bfloat16)
  if platform == 'tpu':
    shard = lambda spec: NamedSharding(mesh, spec)
    weights = jax.ShapeDtypeStruct(weights.shape, weights.dtype,
                                   sharding=shard(PartitionSpec(None, None, 'fsdp')))
    x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(PartitionSpec('fsdp')))
  compiled = jax.jit(jax.grad(_loss)).lower(weights, x).compile()
  matmul = 2 * ROWS * WIDTH * WIDTH
  # Per layer: 2 forward, 1 recomputed (the second product is not needed backwards), 2 for the
  # weight gradients and 2 for the input gradients.
  expected = LAYERS * 7 * matmul
  chips = 4 if platform == 'tpu' else 1
  assert matmul_flops(compiled.as_text()) * chips == pytest.approx(expected, rel=1e-6)
  assert compiled.cost_analysis()['flops'] * chips < 0.3 * expected  # the scan body once


def test_grouped_attention_einsums_count_valid_taps_only(mesh):
  b, t, s, k, g, d = 8, 256, 192, 2, 4, 64
  shard = NamedSharding(mesh, PartitionSpec('fsdp'))
  args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=shard)
          for shape in ((b, t, k, g, d), (b, s, k, d), (b, s, k, d))]

  def attend(q, k, v):
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
    return jnp.einsum('bkgts,bskd->btkgd', scores.astype(v.dtype), v)

  compiled = jax.jit(attend).lower(*args).compile()
  assert matmul_flops(compiled.as_text()) * 4 == 2 * (2 * b * t * s * k * g * d)


# XLA's windowed einsums (an fsdp weight all-gathered piecewise, seen in the 7B step) count a
# loop by 2 (`counter < 16`, `counter + 2`): 8 iterations, not 16.
STEPPING_BY_TWO = """HloModule stepping

%condition (c.param: (s32[], f32[8,8])) -> pred[] {
  %c.param = (s32[], f32[8,8]{1,0}) parameter(0)
  %c.counter = s32[] get-tuple-element(%c.param), index=0
  %c.bound = s32[] constant(16)
  ROOT %c.less = pred[] compare(%c.counter, %c.bound), direction=LT
}

%body (b.param: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %b.param = (s32[], f32[8,8]{1,0}) parameter(0)
  %b.counter = s32[] get-tuple-element(%b.param), index=0
  %b.x = f32[8,8]{1,0} get-tuple-element(%b.param), index=1
  %b.two = s32[] constant(2)
  %b.next = s32[] add(%b.counter, %b.two)
  %b.y = f32[8,8]{1,0} dot(%b.x, %b.x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %b.out = (s32[], f32[8,8]{1,0}) tuple(%b.next, %b.y)
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}) tuple(%zero, %x)
  %loop = (s32[], f32[8,8]{1,0}) while(%init), condition=%condition, body=%body
  ROOT %result = f32[8,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_a_loop_stepping_by_two_runs_half_its_bound():
  assert matmul_flops(STEPPING_BY_TWO) == 8 * 2 * 8 * 8 * 8
  assert matmul_flops(STEPPING_BY_TWO.replace('constant(2)', 'constant(1)')) == 16 * 2 * 8 * 8 * 8
  with pytest.raises(UnknownTripCount):
    matmul_flops(STEPPING_BY_TWO.replace('%zero = s32[] constant(0)', '%zero = s32[] parameter(1)'))


def test_a_loop_of_unknown_length_is_refused():
  def until_small(x):
    return jax.lax.while_loop(lambda x: jnp.sum(x) > 1, lambda x: jnp.dot(x, x) * 0.5, x)

  text = jax.jit(until_small).lower(jnp.ones((8, 8))).compile().as_text()
  with pytest.raises(UnknownTripCount):
    matmul_flops(text)
