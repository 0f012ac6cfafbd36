"""Vision-Infused Layer Normalization (ViLN) and its conditioners.

    x_i = h_i / rms(h_i);  [dg_i; db_i] = C_l(x_i, V);  ViLN(h_i, V) = (g + dg_i) * x_i + db_i

Shapes: B batch, T text length, N visual tokens per row, D LLM width, C visual width (d_ctx),
G conditioner groups (`kv_groups`), Hc / Dc conditioner heads / head width.

What the conditioners read is computed in two parts, outside the layer loop:
- `ViLNContext`: the visual memory, once per sample and independent of the text (the attention
  conditioner's keys and values per group; for mlp the visual tokens, for conv the ConvMixer
  output per group). Decoding computes it at prefill and reuses it at every step.
- `token_conditioning`: the cheap per-text-token part, from how many items each token has seen:
  the `allowed` mask (text token i sees only the visual items whose placeholder is at or before
  i) and, for mlp/conv, the masked mean of the memory over the allowed tokens.
Each modulated norm then owns a small conditioner (query/first projection and a
zero-initialised last projection).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lavi_jax.models.attention import Mask, attention
from lavi_jax.models.layers import Dense, LayerNorm, constrain, dtype_of, partitioned, rms_normalize
from lavi_jax.models.visual import VisualTokens

# {'mask', 'item' (B,N); 'k','v' (G,B,N,Hc,Dc) | 'tokens' (B,N,C) (mlp) | 'mixed' (G,B,N,C)}
VisualMemory = dict[str, Any]
# {'mask' (attention.Mask, T x N), 'has_visual' (B,T); 'k','v' (G,B,N,Hc,Dc) | 'summary' (G,B,T,C)}
Conditioning = dict[str, Any]


def masked_mean(allowed: jax.Array, tokens: jax.Array) -> jax.Array:
  """allowed (B, T, N), tokens (B, N, C) -> (B, T, C) float32 mean over the allowed tokens (0 if
  none). Sums and counts are float32 whatever the tokens' dtype (bfloat16 counts 7,290 as 7,296)."""
  total = jnp.einsum('btn,bnc->btc', allowed.astype(tokens.dtype), tokens,
                     preferred_element_type=jnp.float32)
  count = jnp.maximum(allowed.sum(-1, keepdims=True, dtype=jnp.float32), 1)
  return total / count


class ConvMixer(nn.Module):
  """ConvMixer block over each frame's token grid: depthwise conv, then pointwise.

  tokens (B, N, C) with `segments` = ((F, h, w), ...) laying out N -> (B, N, C).
  """
  config: ml_collections.FrozenConfigDict
  segments: tuple[tuple[int, int, int], ...]

  @nn.compact
  def __call__(self, tokens):
    cfg, c = self.config, tokens.shape[-1]
    k = cfg.viln.conv_kernel
    dtype, param_dtype = tokens.dtype, dtype_of(cfg.param_dtype)
    kernel = self.param('depthwise_kernel',
                        partitioned(nn.initializers.lecun_normal(), (None, None, 'ctx_embed')),
                        (k, k, c), param_dtype)
    bias = self.param('depthwise_bias', partitioned(nn.initializers.zeros, ('ctx_embed',)), (c,),
                      param_dtype)
    norm1 = LayerNorm(1e-6, 'ctx_embed', dtype, param_dtype, name='norm1')
    pieces, start = [], 0
    for f, h, w in self.segments:
      b = tokens.shape[0]
      grid = tokens[:, start:start + f * h * w].reshape(b * f, h, w, c)
      conv = jax.lax.conv_general_dilated(
          grid, kernel.astype(dtype)[:, :, None, :], (1, 1), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
      grid = grid + norm1(nn.gelu(conv + bias.astype(dtype)))
      pieces.append(grid.reshape(b, f * h * w, c))
      start += f * h * w
    x = jnp.concatenate(pieces, axis=1)
    x = Dense(c, ('ctx_embed', 'cond_mlp'), dtype=dtype, param_dtype=param_dtype,
              name='pointwise')(x)
    return LayerNorm(1e-6, 'ctx_embed', dtype, param_dtype, name='norm2')(nn.gelu(x))


class ViLNContext(nn.Module):
  """Visual tokens -> the per-sample visual memory every ViLN reads (see module docstring)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, visual: VisualTokens) -> VisualMemory:
    """Each row's visual tokens (B, N) gathered from the encoded pool (see models/visual.py)."""
    cfg = self.config.viln
    dtype, param_dtype = dtype_of(self.config.dtype), dtype_of(self.config.param_dtype)
    out = {'mask': visual.mask, 'item': visual.item}
    groups = cfg.kv_groups
    if cfg.conditioner == 'conv':  # one ConvMixer per group, over each slot's token grids
      mixers = nn.vmap(ConvMixer, variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=None, out_axes=0, axis_size=groups,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      g, k, c = visual.table.shape
      per_slot = sum(h * w for h, w in visual.grids)
      slots = visual.table.astype(dtype).reshape(g * k // per_slot, per_slot, c)
      segments = tuple((1, h, w) for h, w in visual.grids)
      mixed = mixers(self.config, segments, name='conv_mixer')(slots)  # (Gc, G*M, P, C)
      out['mixed'] = jax.vmap(visual.gather)(mixed.reshape(groups, g, k, c))  # (Gc, B, N, C)
      return out
    tokens = constrain(visual.gather().astype(dtype), ('batch', 'vis_tokens', 'ctx_embed'))
    if cfg.conditioner == 'attention':
      for name in ('k', 'v'):
        kv = Dense((groups, cfg.heads, cfg.head_dim),
                   ('ctx_embed', 'layers', 'cond_heads', 'cond_dim'), dtype=dtype,
                   param_dtype=param_dtype, name=f'{name}_proj')(tokens)
        kv = constrain(kv, ('batch', 'vis_tokens', 'layers', 'cond_heads', 'cond_dim'))
        out[name] = kv.transpose(2, 0, 1, 3, 4)  # (G, B, N, Hc, Dc)
    else:  # mlp
      out['tokens'] = tokens
    return out


def token_conditioning(memory: VisualMemory, token_items: jax.Array,
                       kv_dtype: jnp.dtype | None = None,
                       token_segments: jax.Array | None = None,
                       visual_segments: jax.Array | None = None) -> Conditioning:
  """The conditioning of text tokens that have seen `token_items` (B, T) visual items each.

  Every modulated norm reads its visual part (cast to the compute dtype), so the gradient of that
  part is summed over all of them, in its own dtype: the mlp/conv summary is float32, and so are
  the attention keys and values with `kv_dtype=jnp.float32` (`LaVi.conditioning`; decoding, which
  takes no gradient, keeps the memory's dtype). Packed rows (token_segments (B, T), and
  visual_segments (B, N), -1 for invalid tokens): a token sees only its own conversation's items.
  """
  mask = Mask.item_prefix(token_items, memory['mask'], memory['item'])
  if token_segments is not None:  # packed rows: a conversation sees only its own items
    mask = mask.replace(q_segment=token_segments.astype(jnp.int32),
                        kv_segment=visual_segments.astype(jnp.int32))
  if 'k' in memory:  # attention reads the mask itself: no (T, N) array
    k, v = (memory[n] if kv_dtype is None else memory[n].astype(kv_dtype) for n in ('k', 'v'))
    return {'mask': mask, 'has_visual': mask.any_allowed(), 'k': k, 'v': v}
  allowed = constrain(mask.dense(), ('batch', 'length', 'vis_tokens'))
  out = {'mask': mask, 'has_visual': allowed.any(-1)}
  if 'mixed' in memory:
    out['summary'] = jax.vmap(masked_mean, in_axes=(None, 0))(allowed, memory['mixed'])
  else:
    out['summary'] = masked_mean(allowed, memory['tokens'])[None]  # (1, B, T, C)
  return out


class Conditioner(nn.Module):
  """x (B, T, D) normalised text, cond, group index -> (dg, db), each (B, T, D)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x, cond: Conditioning, group):
    cfg = self.config.viln
    d = x.shape[-1]
    kw = dict(dtype=x.dtype, param_dtype=dtype_of(self.config.param_dtype))
    # With a tanh gate the gate is the zero at step 0; a zero last projection too would never
    # receive a gradient, so it then starts random.
    zero_last = cfg.gate != 'tanh'
    if cfg.conditioner == 'attention':
      q = Dense((cfg.heads, cfg.head_dim), ('embed', 'cond_heads', 'cond_dim'), use_bias=False,
                name='q_proj', **kw)(x)
      k, v = (jnp.take(cond[name], group, axis=0).astype(x.dtype) for name in ('k', 'v'))
      a = attention(q, k, v, cond['mask'], self.config.attention, self.config.attention_block)
      delta = Dense((2, d), ('cond_heads', 'cond_dim', None, 'embed'), in_axes_count=2,
                    zero_init=zero_last, name='o_proj', **kw)(a)
    else:
      summary = jnp.take(cond['summary'], jnp.minimum(group, cond['summary'].shape[0] - 1),
                         axis=0)
      hidden = Dense(cfg.mlp_dim, ('embed', 'cond_mlp'), name='fc1', **kw)(
          jnp.concatenate([x, summary.astype(x.dtype)], axis=-1))
      delta = Dense((2, d), ('cond_mlp', None, 'embed'), zero_init=zero_last, name='fc2',
                    **kw)(nn.gelu(hidden))
    delta = constrain(delta.astype(jnp.float32), ('batch', 'length', None, 'embed'))
    if cfg.gate == 'tanh':
      alpha = self.param('gate', partitioned(nn.initializers.zeros, ()), (), jnp.float32)
      delta = delta * jnp.tanh(alpha)
    if cfg.delta_clip > 0:
      delta = cfg.delta_clip * jnp.tanh(delta / cfg.delta_clip)
    delta = delta * cond['has_visual'][..., None, None]
    return delta[..., 0, :], delta[..., 1, :]


class ViLN(nn.Module):
  """RMSNorm whose scale and shift are modulated per token by a conditioner.

  h (B, T, D) -> (B, T, D). Unmodulated (or with cond=None) it is exactly the HF RMSNorm.
  """
  config: ml_collections.FrozenConfigDict
  modulated: bool

  @nn.compact
  def __call__(self, h, cond: Conditioning | None, group=0):
    d = h.shape[-1]
    scale = self.param('scale', partitioned(nn.initializers.ones, ('norm',)), (d,),
                       dtype_of(self.config.param_dtype))
    x = rms_normalize(h, self.config.llm.rms_norm_eps)
    plain = scale.astype(h.dtype) * x.astype(h.dtype)  # HF's rounding in the compute dtype
    if not self.modulated or cond is None:
      return plain
    dg, db = Conditioner(self.config, name='conditioner')(x.astype(h.dtype), cond, group)
    # Per-token size of the deltas, (B, T, 2): RMS over the width of dg and db. Kept only when
    # the 'intermediates' collection is mutable (lavi_jax/eval/modulation.py).
    rms = lambda d: jnp.sqrt(jnp.mean(jnp.square(d), axis=-1))
    self.sow('intermediates', 'delta_rms', jnp.stack([rms(dg), rms(db)], axis=-1))
    # The plain norm plus the float32 deltas, rounded once: zero deltas (zero-initialised
    # conditioners, tokens before any item) give exactly the plain norm in every dtype.
    return (plain.astype(jnp.float32) + (dg * x + db)).astype(h.dtype)
