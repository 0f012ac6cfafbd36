"""Masked next-token cross-entropy computed in chunks of positions.

Shapes: B batch, T text length, D width, V vocabulary, c positions per chunk.

Float32 logits (B, T, V) of a 7B model's 152K-word vocabulary take 1.2 GB per 2048-token row, and
the loss's softmax and gradient as much again. Here the LLM's final hidden states are turned
into logits c positions at a time inside a scan whose body is rematerialised, so at most
(B, c, V) float32 logits exist at once, forward and backward.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """(B, T, ...) -> (T / c, B, c, ...), T padded with zeros to a multiple of c."""
  b, t = x.shape[:2]
  x = jnp.pad(x, [(0, 0), (0, -t % chunk)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape((b, -1, chunk) + x.shape[2:]).swapaxes(0, 1)


def token_sums(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array,
               targets: jax.Array, loss_mask: jax.Array,
               chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed NLL, loss tokens, tokens predicted correctly) over the masked positions.

  logits_fn: hidden (B, c, D) -> float32 logits (B, c, V); hidden (B, T, D); targets, loss_mask
  (B, T); chunk: c (at most T).
  """
  chunk = min(chunk, hidden.shape[1])

  @jax.checkpoint
  def one(sums, piece):
    h, target, mask = piece
    log_probs = jax.nn.log_softmax(logits_fn(h), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(log_probs, axis=-1) == target).astype(jnp.float32) * mask
    return (sums[0] + jnp.sum(nll * mask), sums[1] + jnp.sum(mask),
            sums[2] + jnp.sum(correct)), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(one, (zero, zero, zero),
                         (_chunks(hidden, chunk), _chunks(targets, chunk),
                          _chunks(loss_mask, chunk)))
  return sums
