"""Compute dtype and rematerialisation: bf16 stays close to f32; every remat policy gives the
same gradients as none."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from lavi_jax.models import LaVi, init_params
from tests.helpers import perturb, random_images, tiny_config


def _batch(model):
  ids = jax.random.randint(jax.random.key(1), (2, 10), 3, model.llm.vocab_size)
  return dict(input_ids=ids.at[:, 2].set(model.image_token_id),
              images=random_images(model, 2, 1, 2))


def test_bfloat16_compute_is_close_to_float32():
  model = tiny_config().model
  params = perturb(nn.unbox(init_params(model, jax.random.key(0))), scale=0.05)
  batch = _batch(model)
  f32 = LaVi(model).apply({'params': params}, **batch)
  model.dtype = 'bfloat16'
  bf16 = LaVi(model).apply({'params': params}, **batch)
  assert bf16.dtype == np.float32  # logits are always float32
  err = np.abs(np.asarray(bf16) - np.asarray(f32)).max() / np.abs(np.asarray(f32)).max()
  assert 0 < err < 0.05


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch', 'qkv_proj'])
def test_remat_policies_keep_gradients(policy):
  model = tiny_config().model
  params = perturb(nn.unbox(init_params(model, jax.random.key(0))))
  batch = _batch(model)

  def grads(remat):
    model.remat = remat
    loss = lambda p: LaVi(model).apply({'params': p}, **batch).std()
    return jax.jit(jax.grad(loss))(params)

  expected, actual = grads('none'), grads(policy)
  for e, a in zip(jax.tree.leaves(expected), jax.tree.leaves(actual)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-5, rtol=1e-4)
