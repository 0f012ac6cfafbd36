"""Matmul FLOPs and HBM bytes read from optimised HLO (lavi_jax.compiled_cost) against counts made
by hand: loops (a scan, XLA's windowed einsums) count their trip count, batched and grouped einsums
(TPU convolutions with padded, dilated windows) their valid taps only; a weight prefetched into
VMEM is read from HBM once, a gather or an in-place update moves its rows only."""
# pylint: disable=redefined-outer-name

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lavi_jax import compile as compile_lib
from lavi_jax.compiled_cost import UnknownTripCount, hbm_bytes, matmul_flops

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


def _tpu_program(mesh, fn, *shapes, donate=()):
  """fn compiled for one TPU chip; shapes: (shape, dtype) pairs."""
  one_chip = NamedSharding(Mesh(mesh.devices.flat[:1], ('x',)), PartitionSpec())
  args = [jax.ShapeDtypeStruct(shape, dtype, sharding=one_chip) for shape, dtype in shapes]
  return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def _tanh_chain(weights, x):
  for w in weights:
    x = jnp.tanh(x @ w)
  return x


@pytest.mark.parametrize('form', ['unrolled', 'scanned', 'loop of unknown length'])
def test_a_decode_step_reads_each_weight_from_hbm_once(mesh, form):
  weight, weights = (WIDTH * 4, WIDTH * 4), (LAYERS, WIDTH * 4, WIDTH * 4)
  fn = dict(
      unrolled=lambda w, x: _tanh_chain(list(w), x),
      scanned=lambda w, x: jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0],
      # counted once: one token's step of a loop that runs until a condition on its outputs
      **{'loop of unknown length': lambda w, x: jax.lax.while_loop(
          lambda c: jnp.sum(c[1]) < 1e30, lambda c: (c[0], _tanh_chain(list(c[0]), c[1])),
          (w, x))[1]})[form]
  compiled = _tpu_program(mesh, fn, (weights, jnp.bfloat16), ((1, weight[1]), jnp.bfloat16))
  weight_bytes = math.prod(weights) * 2
  assert hbm_bytes(compiled.as_text()) == pytest.approx(weight_bytes, rel=0.01)


def test_a_gather_and_an_in_place_update_move_their_rows_only(mesh):
  rows, row_bytes = 32768, WIDTH * 4 * 2
  lookup = _tpu_program(mesh, lambda table, ids: jnp.take(table, ids, axis=0) * 2,
                        ((rows, WIDTH * 4), jnp.bfloat16), ((4,), jnp.int32))
  assert 4 * row_bytes <= hbm_bytes(lookup.as_text()) < 16 * row_bytes
  update = _tpu_program(
      mesh, lambda cache, row, i: jax.lax.dynamic_update_slice(cache, jnp.tanh(row), (i, 0)),
      ((rows, WIDTH * 4), jnp.bfloat16), ((1, WIDTH * 4), jnp.bfloat16), ((), jnp.int32),
      donate=(0,))
  assert row_bytes <= hbm_bytes(update.as_text()) < 4 * row_bytes
  copied = _tpu_program(  # not donated: the cache is copied, read and written whole
      mesh, lambda cache, row, i: jax.lax.dynamic_update_slice(cache, jnp.tanh(row), (i, 0)),
      ((rows, WIDTH * 4), jnp.bfloat16), ((1, WIDTH * 4), jnp.bfloat16), ((), jnp.int32))
  assert hbm_bytes(copied.as_text()) >= 2 * rows * row_bytes
