"""Qwen2 / LLaMA decoder whose norms are ViLN.

Shapes: B batch, T query length, S key length, D width, H heads, K kv heads, Dh head width,
V vocabulary. Parameter names mirror Hugging Face (`embed_tokens`, `self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `norm`, `lm_head`).

Layers are stacked with `nn.scan` over blocks of `period` layers, where `period` is the smallest
repeat of the pattern of ViLN-modulated layers (1 when every layer is modulated the same way):
layer l lives at `layers/layer_{l % period}` index `l // period`. Unscanned, it is `layers_{l}`.

Decoding passes a `KVCache` (L layers, S slots) to `LLM.hidden_states`, which returns it with the
new tokens' keys and values stored. The cache is an explicit input and output, not a Flax
variable collection: it is threaded through the layers (scanned: as part of the scan carry, with
each layer's index a scanned input), and each layer writes its keys and values at its own index
before attending, so XLA updates the cache in place inside a decode loop.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lavi_jax import config as lavi_config
from lavi_jax.models.attention import attention
from lavi_jax.models.layers import Dense, constrain, dtype_of, partitioned, remat
from lavi_jax.models.viln import Conditioning, ViLN


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (HF `rotate_half` convention). x (B, T, H, Dh), positions (B, T)."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, Dh/2)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., dh // 2:], x32[..., :dh // 2]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def modulation_period(pattern: tuple[bool, ...]) -> int:
  """Smallest p dividing len(pattern) with pattern[l] == pattern[l % p] for all l."""
  n = len(pattern)
  for p in range(1, n + 1):
    if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
      return p
  return n


def layer_param_path(model: ml_collections.ConfigDict, layer: int) -> tuple[tuple[str, ...], int | None]:
  """Where layer `layer`'s parameters live under the LLM: (path, index on the scanned axis)."""
  if not model.scan_layers:
    return (f'layers_{layer}',), None
  period = modulation_period(lavi_config.modulated_layers(model))
  return ('layers', f'layer_{layer % period}'), layer // period


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for S slots, and where the next tokens are written.

  k, v: (L, B, S, K, Dh) after RoPE; index: () int32, the slot of the first of the next T tokens
  (the same for every row: rows of different lengths leave masked, unused slots).
  """
  k: jax.Array
  v: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, model: ml_collections.ConfigDict, batch: int, slots: int) -> KVCache:
    llm = model.llm
    shape = (llm.num_layers, batch, slots, llm.num_kv_heads, lavi_config.head_dim(llm))
    dtype = dtype_of(model.dtype)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  def store(self, layer, k: jax.Array, v: jax.Array) -> KVCache:
    """Layer `layer`'s k, v (B, T, K, Dh) of the next T tokens -> slots index..index+T-1."""
    update = lambda cache, new: jax.lax.dynamic_update_slice(
        cache, new[None].astype(cache.dtype), (layer, 0, self.index, 0, 0))
    return self.replace(k=update(self.k, k), v=update(self.v, v))


class Attention(nn.Module):
  """GQA self-attention with RoPE. x (B, T, D), positions (B, T), mask: a `Mask` or (B, T, S).

  Without a cache, S = T. With a `KVCache`, the T tokens' keys and values are first stored as
  layer `layer`'s and then attended to with the rest of its S slots. Returns (out (B, T, D), the
  updated cache or None).
  """
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x, positions, mask, cache: KVCache | None = None, layer=None):
    cfg = self.config.llm
    hd = lavi_config.head_dim(cfg)
    kw = dict(dtype=x.dtype, param_dtype=dtype_of(self.config.param_dtype))
    q = Dense((cfg.num_heads, hd), ('embed', 'heads', 'head_dim'), use_bias=cfg.qkv_bias,
              name='q_proj', **kw)(x)
    k = Dense((cfg.num_kv_heads, hd), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
              name='k_proj', **kw)(x)
    v = Dense((cfg.num_kv_heads, hd), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
              name='v_proj', **kw)(x)
    q = checkpoint_name(rope(q, positions, cfg.rope_theta), 'query')
    k = checkpoint_name(rope(k, positions, cfg.rope_theta), 'key')
    v = checkpoint_name(v, 'value')
    q = constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    k = constrain(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    if cache is not None:
      cache = cache.store(layer, k, v)
      k, v = (constrain(c[layer], ('batch', 'length', 'kv_heads', 'head_dim'))
              for c in (cache.k, cache.v))
    out = attention(q, k, v, mask, self.config.attention, self.config.attention_block)
    out = constrain(out, ('batch', 'length', 'heads', 'head_dim'))
    return Dense(cfg.hidden_size, ('heads', 'head_dim', 'embed'), use_bias=False,
                 in_axes_count=2, name='o_proj', **kw)(out), cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). x (B, T, D) -> (B, T, D)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x):
    cfg = self.config.llm
    kw = dict(dtype=x.dtype, param_dtype=dtype_of(self.config.param_dtype), use_bias=False)
    gate = Dense(cfg.intermediate_size, ('embed', 'mlp'), name='gate_proj', **kw)(x)
    up = Dense(cfg.intermediate_size, ('embed', 'mlp'), name='up_proj', **kw)(x)
    hidden = constrain(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return Dense(cfg.hidden_size, ('mlp', 'embed'), name='down_proj', **kw)(hidden)


class DecoderLayer(nn.Module):
  """h + attn(ViLN_attn(h)), then + mlp(ViLN_mlp(h)). h (B, T, D) -> (h (B, T, D), cache).

  cache: None, or the KVCache, returned with this layer's (`layer`) new keys and values.
  """
  config: ml_collections.FrozenConfigDict
  modulated: bool

  @nn.compact
  def __call__(self, h, positions, mask, cond: Conditioning | None, group,
               cache: KVCache | None = None, layer=None):
    sublayers = self.config.viln.sublayers
    x = ViLN(self.config, self.modulated and 'attn' in sublayers, name='input_layernorm')(
        h, cond, group)
    out, cache = Attention(self.config, name='self_attn')(x, positions, mask, cache, layer)
    h = h + out
    x = ViLN(self.config, self.modulated and 'mlp' in sublayers,
             name='post_attention_layernorm')(h, cond, group)
    h = h + MLP(self.config, name='mlp')(x)
    return constrain(h, ('batch', 'length', 'embed')), cache


class DecoderBlock(nn.Module):
  """`period` consecutive layers: the unit that nn.scan repeats.

  carry: (h, KVCache or None); groups, layers (period,): the layers' conditioner groups and
  indices. Returns (carry, None).
  """
  config: ml_collections.FrozenConfigDict
  pattern: tuple[bool, ...]

  @nn.compact
  def __call__(self, carry, groups, layers, positions, mask, cond):
    h, cache = carry
    for j, modulated in enumerate(self.pattern):
      h, cache = DecoderLayer(self.config, modulated, name=f'layer_{j}')(
          h, positions, mask, cond, groups[j], cache, layers[j])
    return (h, cache), None


class LLM(nn.Module):
  """Decoder-only language model with ViLN norms."""
  config: ml_collections.FrozenConfigDict  # the model config

  def setup(self):
    cfg, llm = self.config, self.config.llm
    param_dtype = dtype_of(cfg.param_dtype)
    self.embed_tokens = nn.Embed(
        llm.vocab_size, llm.hidden_size, dtype=dtype_of(cfg.dtype), param_dtype=param_dtype,
        embedding_init=partitioned(nn.initializers.normal(0.02), ('vocab', 'embed')))
    pattern = lavi_config.modulated_layers(cfg)
    n = llm.num_layers
    self.group_ids = np.array(
        [lavi_config.group_of_layer(l, n, cfg.viln.kv_groups) for l in range(n)], np.int32)
    if cfg.scan_layers:
      period = modulation_period(pattern)
      block = remat(DecoderBlock, cfg.remat, prevent_cse=False)
      self.layers = nn.scan(
          block, variable_axes={'params': 0, 'intermediates': 0}, split_rngs={'params': True},
          in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast), length=n // period,
          metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, pattern[:period])
      self.period = period
    else:
      layer = remat(DecoderLayer, cfg.remat)
      self.layers = [layer(cfg, pattern[l]) for l in range(n)]
    self.norm = ViLN(cfg, cfg.fusion == 'viln' and 'final' in cfg.viln.sublayers)
    if not llm.tie_word_embeddings:
      self.lm_head = Dense(llm.vocab_size, ('embed', 'vocab'), use_bias=False,
                           dtype=dtype_of(cfg.dtype), param_dtype=param_dtype)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """input_ids (B, T) -> embeddings (B, T, D) in the compute dtype."""
    return self.embed_tokens(input_ids)

  def hidden_states(self, embeds, positions, mask, cond: Conditioning | None = None,
                    cache: KVCache | None = None):
    """embeds (B, T, D), positions (B, T), mask (B, T, S) -> final-normed hidden (B, T, D).

    Without a cache S = T. With a `KVCache` of S slots, the T tokens' keys and values are stored
    from its index on; returns (hidden, the cache with its index advanced by T).
    """
    h = constrain(embeds, ('batch', 'length', 'embed'))
    caching = cache is not None
    if self.config.scan_layers:
      groups = jnp.asarray(self.group_ids.reshape(-1, self.period))
      layers = jnp.arange(len(self.group_ids)).reshape(-1, self.period)
      (h, cache), _ = self.layers((h, cache), groups, layers, positions, mask, cond)
    else:
      for l, (layer, group) in enumerate(zip(self.layers, self.group_ids)):
        h, cache = layer(h, positions, mask, cond, int(group), cache, l)
    h = self.norm(h, cond, int(self.group_ids[-1]))
    if not caching:
      return h
    return h, cache.replace(index=cache.index + h.shape[1])

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden (B, T, D) -> logits (B, T, V) in float32."""
    if self.config.llm.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), ('batch', 'length', 'vocab'))

  def __call__(self, input_ids, positions, mask, cond: Conditioning | None = None):
    """input_ids (B, T) -> logits (B, T, V)."""
    return self.logits(self.hidden_states(self.embed(input_ids), positions, mask, cond))
