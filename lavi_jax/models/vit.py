"""SigLIP-style vision transformer returning the hidden states of chosen layers.

Shapes: M images (crops/frames flattened), P patches per image, D width, H heads.
Parameter names mirror Hugging Face `SiglipVisionModel` (`patch_embedding`,
`position_embedding`, `layers_i/{layer_norm1, self_attn, layer_norm2, mlp}`, `post_layernorm`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lavi_jax.models.attention import attention
from lavi_jax.models.layers import Dense, LayerNorm, constrain, dtype_of, partitioned, remat


def resolve_feature_layers(vision: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Feature layers as indices into (embeddings, layer 1, ..., layer L)."""
  n = vision.num_layers + 1
  return tuple(f % n for f in vision.feature_layers)


class SiglipAttention(nn.Module):
  config: ml_collections.FrozenConfigDict  # the model config

  @nn.compact
  def __call__(self, x):
    cfg = self.config.vision
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    kw = dict(dtype=x.dtype, param_dtype=dtype_of(self.config.param_dtype))
    q, k, v = (Dense((heads, head_dim), ('vis_embed', 'vis_heads', 'head_dim'), name=n, **kw)(x)
               for n in ('q_proj', 'k_proj', 'v_proj'))
    out = attention(q, k, v, None, self.config.attention, self.config.attention_block)
    return Dense(cfg.hidden_size, ('vis_heads', 'head_dim', 'vis_embed'), in_axes_count=2,
                 name='out_proj', **kw)(out)


class SiglipMLP(nn.Module):
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x):
    cfg = self.config.vision
    kw = dict(dtype=x.dtype, param_dtype=dtype_of(self.config.param_dtype))
    x = Dense(cfg.intermediate_size, ('vis_embed', 'vis_mlp'), name='fc1', **kw)(x)
    x = constrain(nn.gelu(x, approximate=True), ('batch', 'length', 'vis_mlp'))
    return Dense(cfg.hidden_size, ('vis_mlp', 'vis_embed'), name='fc2', **kw)(x)


class SiglipLayer(nn.Module):
  """Pre-LN transformer block: x + attn(LN1(x)), then + mlp(LN2(x))."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x):
    norm = lambda name: LayerNorm(self.config.vision.layer_norm_eps, 'vis_embed', x.dtype,
                                  dtype_of(self.config.param_dtype), name=name)
    x = x + SiglipAttention(self.config, name='self_attn')(norm('layer_norm1')(x))
    x = x + SiglipMLP(self.config, name='mlp')(norm('layer_norm2')(x))
    return constrain(x, ('batch', 'length', 'vis_embed'))


class ViT(nn.Module):
  """pixel_values (M, S, S, 3) uint8 (normalised here, as SigLIP: x / 127.5 - 1) or float in
  [-1, 1] -> features (M, P, D * len(feature_layers)).

  Only the layers up to the deepest feature layer run; the rest (and `post_layernorm`) exist so
  that a full SigLIP checkpoint loads and exports unchanged.
  """
  config: ml_collections.FrozenConfigDict  # the model config

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg = self.config.vision
    dtype, param_dtype = dtype_of(self.config.dtype), dtype_of(self.config.param_dtype)
    p = cfg.patch_size
    m, s = pixel_values.shape[0], pixel_values.shape[1]
    g = s // p  # like a VALID conv, a remainder of the image beyond g*p pixels is unused
    pixel_values = pixel_values[:, :g * p, :g * p]
    if jnp.issubdtype(pixel_values.dtype, jnp.integer):
      pixel_values = pixel_values.astype(jnp.float32) / 127.5 - 1.0
    patches = pixel_values.astype(dtype).reshape(m, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(m, g * g, p, p, 3)
    x = Dense(cfg.hidden_size, (None, None, None, 'vis_embed'), in_axes_count=3,
              dtype=dtype, param_dtype=param_dtype, name='patch_embedding')(patches)
    pos = self.param('position_embedding',
                     partitioned(nn.initializers.normal(0.02), ('vis_tokens', 'vis_embed')),
                     (g * g, cfg.hidden_size), param_dtype)
    x = constrain(x + pos.astype(dtype), ('batch', 'length', 'vis_embed'))
    feature_layers = resolve_feature_layers(cfg)
    hidden, done = {0: x}, 0
    for end in sorted(set(feature_layers) - {0}):  # run up to each feature layer in turn
      x = hidden[end] = self._layers(x, done, end)
      done = end
    if self.is_initializing():  # create unused parameters without changing the output
      self._layers(x, done, cfg.num_layers)
      LayerNorm(cfg.layer_norm_eps, 'vis_embed', dtype, param_dtype, name='post_layernorm')(x)
    return jnp.concatenate([hidden[f] for f in feature_layers], axis=-1)

  def _layers(self, x: jax.Array, start: int, end: int) -> jax.Array:
    """x (M, P, D) through layers start..end-1 (parameters `layers_{i}`).

    With `vision.scan_layers`, one `lax.scan` over the layers' parameters stacked (their layout
    stays `layers_{i}`): the backward pass then finishes each layer's gradients inside its
    iteration, where unrolled XLA may keep every layer's MLP activation gradients to the end. 7B
    finetune, temporaries per chip: v5p-64 at one row per chip 4.4 GiB scanned, 9.2 unrolled;
    v5e-256 at four rows 11.3 scanned, 8.4 unrolled (hence off by default).
    """
    layer_cls = remat(SiglipLayer, self.config.remat)
    if not self.config.vision.scan_layers or self.is_initializing():
      for i in range(start, end):
        x = layer_cls(self.config, name=f'layers_{i}')(x)
      return x
    layers = [self.variables['params'][f'layers_{i}'] for i in range(start, end)]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *layers)
    layer = layer_cls(self.config, parent=None)
    return jax.lax.scan(lambda h, p: (layer.apply({'params': p}, h), None), x, stacked)[0]
