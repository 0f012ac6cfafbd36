"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling.

Shapes: B batch, V vocabulary. Every row has its own settings and random key, so a row's tokens
do not depend on the other rows of its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded.

  temperature 0 is greedy (argmax); else logits / temperature are sampled after keeping the
  `top_k` most likely tokens (0: all) and then the smallest set whose probability reaches `top_p`
  (1: all), as Hugging Face's TopK then TopP warpers. `seed` makes sampling reproducible.
  """
  max_new_tokens: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}')
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


def _sample_row(logits, key, temperature, top_k, top_p):
  """logits (V,) -> one token id drawn from the filtered, tempered distribution."""
  v = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  ranked = jnp.sort(scaled)[::-1]
  rank = jnp.arange(v)
  in_top_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  ranked = jnp.where(in_top_k, ranked, -jnp.inf)
  probs = jax.nn.softmax(ranked)
  in_top_p = (jnp.cumsum(probs) - probs) < top_p  # the most likely token is always kept
  threshold = jnp.min(jnp.where(in_top_k & in_top_p, ranked, jnp.inf))
  return jax.random.categorical(key, jnp.where(scaled >= threshold, scaled, -jnp.inf))


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """logits (B, V), keys (B,) typed PRNG keys, temperature/top_k/top_p (B,) -> (B,) int32.

  Rows with temperature 0 take the argmax; the sorting that sampling needs runs only when some
  row samples.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampling = temperature > 0
  drawn = jax.lax.cond(
      jnp.any(sampling),
      lambda: jax.vmap(_sample_row)(logits, keys, temperature, top_k, top_p).astype(jnp.int32),
      lambda: greedy)
  return jnp.where(sampling, drawn, greedy)
