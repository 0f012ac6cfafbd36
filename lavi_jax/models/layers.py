"""Building blocks shared by the models: logically partitioned dense layers and norms
(attention: models/attention.py).

Shapes: B batch, T length, D width.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def dtype_of(name: str):
  return DTYPES[name]


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


def partitioned(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
  """A dense layer whose kernel (input axes + output axes) and bias carry logical axis names.

  `features` may be a tuple (e.g. (heads, head_dim)); the last `in_axes_count` input dims are
  contracted. Parameters: `kernel` (*in, *features), `bias` (*features).
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  use_bias: bool = True
  in_axes_count: int = 1
  zero_init: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = self.features if isinstance(self.features, tuple) else (self.features,)
    n_in = self.in_axes_count
    in_dims = tuple(range(n_in))
    out_dims = tuple(range(n_in, n_in + len(features)))
    if self.zero_init:
      kernel_init = nn.initializers.zeros
    else:
      kernel_init = nn.initializers.variance_scaling(
          1.0, 'fan_in', 'truncated_normal', in_axis=in_dims, out_axis=out_dims)
    kernel = self.param('kernel', partitioned(kernel_init, self.kernel_axes),
                        x.shape[-n_in:] + features, self.param_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), in_dims)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.kernel_axes[n_in:]),
                        features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x), computed in float32 (as Hugging Face Qwen2/LLaMA do)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (statistics in float32); parameters `scale`, `bias`."""
  eps: float
  axis_name: str = 'norm'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param('scale', partitioned(nn.initializers.ones, (self.axis_name,)), (d,),
                       self.param_dtype)
    bias = self.param('bias', partitioned(nn.initializers.zeros, (self.axis_name,)), (d,),
                      self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'qkv_proj': jax.checkpoint_policies.save_only_these_names('query', 'key', 'value'),
}


def remat(module_cls, policy: str, **kwargs):
  """`nn.remat(module_cls)` with a named policy ('none' returns the class unchanged)."""
  if policy == 'none':
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], **kwargs)
