"""The chunked cross-entropy equals the plain one over full logits, with gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.train import loss as loss_lib


def _plain(head, hidden, targets, mask):
  """Reference: full (B, T, V) logits, log-softmax, masked sums."""
  log_probs = jax.nn.log_softmax(hidden @ head, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(log_probs, axis=-1) == targets
  return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


@pytest.mark.parametrize('chunk', [1, 4, 10, 64])  # 10 positions: padded chunks, one, or all
def test_chunked_loss_equals_the_plain_one(chunk):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 10, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 10)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 10)) < 0.7)

  def chunked(head, hidden):
    return loss_lib.token_sums(lambda h: h @ head, hidden, targets, mask, chunk)

  got, want = chunked(head, hidden), _plain(head, hidden, targets, mask.astype(jnp.float32))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_array_equal(got[1:], want[1:])
  grad_got = jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1))(head, hidden)
  grad_want = jax.grad(lambda *a: _plain(*a, targets, mask.astype(jnp.float32))[0],
                       argnums=(0, 1))(head, hidden)
  for g, w in zip(grad_got, grad_want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
