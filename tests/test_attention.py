"""Attention backends against the `xla` reference: every mask kind, float32 and bfloat16,
forward and gradients. The splash kernel runs in Pallas interpret mode on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.models import attention as attention_lib
from lavi_jax.models.attention import Mask

B, H, K, DH = 2, 4, 2, 16


def _masks(t: int, s: int) -> dict:
  """Each mask kind the model builds, on (B, T) queries and (B, S) keys."""
  rng = np.random.default_rng(0)
  valid = np.arange(t)[None] < np.array([[t], [t - 5]])  # right padding on row 1
  visual_item = np.sort(rng.integers(0, 3, (B, s)), axis=1)
  visual_mask = np.arange(s)[None] < np.array([[s], [s - 7]])
  token_items = np.stack([np.minimum(np.arange(t) // 4, 3), np.zeros(t, int)])  # row 1: none
  return {
      'full': (t, t, None),
      'causal_padded': (t, t, Mask.causal_padded(jnp.asarray(valid))),
      'item_prefix': (t, s, Mask.item_prefix(jnp.asarray(token_items), jnp.asarray(visual_mask),
                                             jnp.asarray(visual_item))),
  }


def _inputs(t, s, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, t, H, DH), dtype)
  k = jax.random.normal(keys[1], (B, s, K, DH), dtype)
  v = jax.random.normal(keys[2], (B, s, K, DH), dtype)
  d_out = jax.random.normal(keys[3], (B, t, H, DH), jnp.float32)
  return q, k, v, d_out


def _value_and_grads(fn, q, k, v, d_out):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(d_out.astype(out.dtype))


def _backends():
  cudnn_as_xla = functools.partial(attention_lib._cudnn, implementation='xla')  # pylint: disable=protected-access
  return {
      'blockwise': lambda q, k, v, m: attention_lib.attention(q, k, v, m, 'blockwise', block=16),
      'splash': lambda q, k, v, m: attention_lib.attention(q, k, v, m, 'splash'),
      'cudnn_call': lambda q, k, v, m: (cudnn_as_xla(q, k, v, m or Mask.full(B, q.shape[1],
                                                                             k.shape[1]))),
  }


@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize('kind', ['full', 'causal_padded', 'item_prefix'])
@pytest.mark.parametrize('backend', ['blockwise', 'splash', 'cudnn_call'])
def test_backend_matches_xla(backend, kind, dtype, tolerance):
  t, s, mask = _masks(40, 56)[kind]
  if backend == 'cudnn_call' and kind == 'item_prefix':
    pytest.skip('key lengths cannot express item-prefix masks: `cudnn` falls back to blockwise')
  q, k, v, d_out = _inputs(t, s, dtype)
  reference = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, mask, 'xla'))
  tested = jax.jit(lambda q, k, v: _backends()[backend](q, k, v, mask))
  # The float32 reference of the same inputs: bfloat16 backends are judged against it too.
  want = _value_and_grads(reference, *(x.astype(jnp.float32) for x in (q, k, v)), d_out)
  got = _value_and_grads(tested, q, k, v, d_out)
  for name, w, g in zip(('out', 'dq', 'dk', 'dv'), want, got):
    g = np.asarray(g, np.float32)
    scale = max(float(np.abs(w).max()), 1e-6)
    np.testing.assert_allclose(g, w, atol=tolerance * scale, rtol=tolerance, err_msg=name)


def test_rows_with_nothing_allowed_give_zeros():
  t, s, mask = _masks(40, 56)['item_prefix']
  q, k, v, _ = _inputs(t, s, jnp.float32)
  for backend in ('xla', 'blockwise', 'splash'):
    out = attention_lib.attention(q, k, v, mask, backend, block=16)
    assert np.all(np.asarray(out[1]) == 0), backend  # row 1 has seen no item
    assert np.abs(np.asarray(out[0, 4:])).max() > 0, backend


def test_mask_dense_matches_the_definition():
  t, s, mask = _masks(12, 9)['item_prefix']
  dense = np.asarray(mask.dense())
  q_items, kv_items = np.asarray(mask.q_items), np.asarray(mask.kv_items)
  kv_valid = np.asarray(mask.kv_segment) == 1
  for b in range(B):
    for i in range(t):
      for j in range(s):
        assert dense[b, i, j] == (kv_valid[b, j] and kv_items[b, j] < q_items[b, i])
  causal = np.asarray(Mask.causal_padded(np.array([[True] * 5 + [False] * 3])).dense())[0]
  expected = np.tril(np.ones((8, 8), bool)) & (np.arange(8) < 5)[None]
  np.testing.assert_array_equal(causal, expected)
  np.testing.assert_array_equal(np.asarray(mask.any_allowed(block=4)), dense.any(-1))


def test_auto_and_fallbacks():
  item = _masks(8, 8)['item_prefix'][2]
  padded = _masks(8, 8)['causal_padded'][2]
  assert attention_lib.resolve('auto', padded) == 'xla'  # on CPU
  assert attention_lib.resolve('splash', item) == 'blockwise'
  assert attention_lib.resolve('splash', padded) == 'splash'
  assert attention_lib.resolve('cudnn', item) == 'blockwise'
  assert attention_lib.resolve('splash', jnp.ones((1, 8, 8), bool)) == 'xla'
  with pytest.raises(ValueError, match='model.attention'):
    attention_lib.resolve('flash', padded)
