"""The ViT's layers run as one lax.scan (`vision.scan_layers`) give the unrolled layers' features
and gradients, for any feature layers, with the parameter layout unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.models.vit import ViT
from tests.helpers import random_images, tiny_config


@pytest.mark.parametrize('feature_layers', [(-2,), (1, -1), (0, 2)])
def test_scanned_vit_equals_unrolled(feature_layers):
  unrolled = tiny_config(**{'vision.feature_layers': feature_layers}).model
  scanned = tiny_config(**{'vision.feature_layers': feature_layers,
                           'vision.scan_layers': True}).model
  pixels = random_images(unrolled, 2, 1, 0)['pixel_values'][:, 0]
  params = ViT(unrolled).init(jax.random.key(0), pixels)['params']
  assert (jax.tree.structure(ViT(scanned).init(jax.random.key(0), pixels)['params']) ==
          jax.tree.structure(params))

  def loss(model, p):
    features = ViT(model).apply({'params': p}, pixels)
    return jnp.sum(jnp.sin(features)), features

  (_, expected), expected_grads = jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True)(
      params)
  (_, features), grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(
      params)
  np.testing.assert_allclose(features, expected, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
