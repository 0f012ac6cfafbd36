"""Projector from ViT features to visual tokens V, with a learned crop/frame-index embedding.

Shapes: B batch, F crops/frames, P tokens per crop/frame, Dv ViT feature width, C = d_ctx.
Names mirror Hugging Face LLaVA's `multi_modal_projector.linear_1/linear_2`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from lavi_jax import config as lavi_config
from lavi_jax.models.layers import Dense, constrain, dtype_of, partitioned


class Projector(nn.Module):
  """features (..., Dv) -> (..., C): linear_2(gelu(linear_1(x)))."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, features):
    c = lavi_config.ctx_dim(self.config)
    kw = dict(dtype=dtype_of(self.config.dtype), param_dtype=dtype_of(self.config.param_dtype))
    x = Dense(c, ('vis_embed', 'vis_mlp'), name='linear_1', **kw)(features)
    return Dense(c, ('vis_mlp', 'ctx_embed'), name='linear_2', **kw)(nn.gelu(x, approximate=False))


class FrameIndexEmbedding(nn.Module):
  """Adds a learned (zero-initialised) embedding of each crop/frame's index within its item.

  tokens (G, M, P, C), frame_index (G, M) -> (G, M, P, C).
  """
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens, frame_index):
    table = self.param('embedding', partitioned(nn.initializers.zeros, ('frames', 'ctx_embed')),
                       (self.config.projector.max_frames, tokens.shape[-1]),
                       dtype_of(self.config.param_dtype))
    index = jnp.minimum(frame_index, table.shape[0] - 1)
    out = tokens + table.astype(tokens.dtype)[index][:, :, None, :]
    return constrain(out, ('batch', 'frames', 'length', 'ctx_embed'))
