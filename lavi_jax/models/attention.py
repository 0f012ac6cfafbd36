"""Scaled dot-product attention with a choice of backend, for the LLM, the ViT and the ViLN
conditioners.

Shapes: B batch, T queries, S keys, H query heads, K key/value heads (H % K == 0), G = H / K,
Dh head width.

Backends (`model.attention`):
- `xla`: einsum scores, float32 softmax, einsum values: the reference; holds (B, H, T, S).
- `blockwise`: plain JAX, keys in blocks of `block` with an online softmax and a custom
  gradient that recomputes each block's probabilities from the saved log-sum-exp (as
  FlashAttention does): never holds more than (B, H, T, block) scores. Any `Mask`.
- `splash`: the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu`), run per
  shard under `shard_map`; on other platforms in Pallas interpret mode (tests). Masks without
  items only (causal or not, segment ids); item-prefix masks fall back to `blockwise`.
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` on GPU: full or causal masks
  with right padding (key lengths) only, 16-bit inputs; otherwise `blockwise`.
- `auto`: by the platform the program is compiled for (the mesh's devices, else the default
  backend): TPU `splash`, GPU `cudnn`, otherwise `xla`.

Every backend computes the same function: rows with no key allowed give zeros.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lavi_jax.config import ATTENTION_BACKENDS

_MASKED = -1e30  # score of a masked key (finite: a row with nothing allowed stays NaN-free)
_SPLASH_BLOCK = 128


@flax.struct.dataclass
class Mask:
  """Which keys each query may attend to, without a (T, S) array:

    allowed[b, t, s] = q_segment[b, t] == kv_segment[b, s]
                       and (not causal or s <= t)
                       and (kv_items is None or kv_items[b, s] < q_items[b, t])

  q_segment (B, T), kv_segment (B, S) int32; q_items (B, T), kv_items (B, S) int32 or None;
  kv_length (B,) int32 or None: set when the allowed keys are exactly the first kv_length
  (right padding, no items), which key-length kernels need.
  """
  q_segment: jax.Array
  kv_segment: jax.Array
  q_items: jax.Array | None = None
  kv_items: jax.Array | None = None
  kv_length: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def causal_padded(cls, valid: jax.Array) -> 'Mask':
    """Causal self-attention over a right-padded sequence, valid (B, T) bool. Key 0 counts as
    valid, so that an all-padding row still attends somewhere (its outputs are never used)."""
    valid = jnp.asarray(valid, bool).at[:, 0].set(True)
    return cls(q_segment=jnp.ones(valid.shape, jnp.int32), kv_segment=valid.astype(jnp.int32),
               kv_length=valid.sum(-1).astype(jnp.int32), causal=True)

  @classmethod
  def full(cls, batch: int, queries: int, keys: int) -> 'Mask':
    return cls(q_segment=jnp.ones((batch, queries), jnp.int32),
               kv_segment=jnp.ones((batch, keys), jnp.int32),
               kv_length=jnp.full((batch,), keys, jnp.int32))

  @classmethod
  def item_prefix(cls, token_items: jax.Array, visual_mask: jax.Array,
                  visual_item: jax.Array) -> 'Mask':
    """ViLN conditioners: text token t sees the valid visual tokens of the items whose
    placeholder is at or before t. token_items (B, T) items seen; visual_mask, visual_item
    (B, N) validity and item index of each visual token."""
    return cls(q_segment=jnp.ones(token_items.shape, jnp.int32),
               kv_segment=visual_mask.astype(jnp.int32),
               q_items=token_items.astype(jnp.int32), kv_items=visual_item.astype(jnp.int32))

  def block(self, start: int | jax.Array, size: int) -> jax.Array:
    """(B, T, size) bool: the mask of keys start .. start + size - 1 (keys past S: False)."""
    kv_segment = jax.lax.dynamic_slice_in_dim(self.kv_segment, start, size, axis=1)
    allowed = self.q_segment[:, :, None] == kv_segment[:, None, :]
    if self.causal:
      t = self.q_segment.shape[1]
      allowed &= (start + jnp.arange(size))[None, None, :] <= jnp.arange(t)[None, :, None]
    if self.kv_items is not None:
      kv_items = jax.lax.dynamic_slice_in_dim(self.kv_items, start, size, axis=1)
      allowed &= kv_items[:, None, :] < self.q_items[:, :, None]
    return allowed

  def dense(self) -> jax.Array:
    """(B, T, S) bool."""
    return self.block(0, self.kv_segment.shape[1])

  def any_allowed(self, block: int = 512) -> jax.Array:
    """(B, T) bool: whether each query may attend to any key (key blocks OR-ed in turn)."""
    if self.kv_length is not None and self.kv_items is None:
      return jnp.ones(self.q_segment.shape, bool)  # key 0 is allowed to every query
    keys = self.kv_segment.shape[1]
    block = min(block, keys)
    mask = self.padded(-(-keys // block) * block)
    step = lambda seen, start: (seen | mask.block(start, block).any(-1), None)
    starts = jnp.arange(0, mask.kv_segment.shape[1], block)
    return jax.lax.scan(step, jnp.zeros(self.q_segment.shape, bool), starts)[0]

  def padded(self, keys: int) -> 'Mask':
    """The mask over `keys` >= S keys, the added ones never allowed."""
    extra = keys - self.kv_segment.shape[1]
    if extra == 0:
      return self
    pad = lambda x, value: jnp.pad(x, ((0, 0), (0, extra)), constant_values=value)
    return self.replace(kv_segment=pad(self.kv_segment, -1),
                        kv_items=None if self.kv_items is None else pad(self.kv_items, 0))


def platform() -> str:
  """The platform the traced program is for: the current mesh's devices, else the default."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve(backend: str, mask: Mask | jax.Array | None) -> str:
  """The backend that runs: `auto` by platform, then a fallback where the kernel cannot
  express the mask (a dense mask array: `xla`)."""
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f'model.attention: {backend!r} is not one of {ATTENTION_BACKENDS}')
  if backend == 'auto':
    backend = {'tpu': 'splash', 'gpu': 'cudnn', 'cuda': 'cudnn', 'rocm': 'cudnn'}.get(
        platform(), 'xla')
  if isinstance(mask, jax.Array):
    return 'xla'
  if backend == 'splash' and mask is not None and mask.kv_items is not None:
    return 'blockwise'
  if backend == 'cudnn' and mask is not None and mask.kv_length is None:
    return 'blockwise'
  return backend


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask | jax.Array | None,
              backend: str = 'xla', block: int = 512) -> jax.Array:
  """q (B, T, H, Dh); k, v (B, S, K, Dh); mask: a `Mask`, a dense (B, T, S) bool array (e.g. a
  KV cache's), or None (full) -> (B, T, H, Dh), softmax in float32."""
  backend = resolve(backend, mask)
  if backend == 'xla':
    dense = mask.dense() if isinstance(mask, Mask) else mask
    return _xla(q, k, v, dense)
  b, t, _, _ = q.shape
  mask = Mask.full(b, t, k.shape[1]) if mask is None else mask
  if backend == 'cudnn' and q.dtype not in (jnp.bfloat16, jnp.float16):
    backend = 'blockwise'  # cuDNN's fused attention takes 16-bit inputs only
  if backend == 'blockwise':
    return _blockwise(q, k, v, mask, block)
  if backend == 'splash':
    return _splash(q, k, v, mask)
  return _cudnn(q, k, v, mask)


def _xla(q, k, v, mask: jax.Array | None) -> jax.Array:
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = scores * (dh ** -0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))[:, None, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if mask is not None:
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
  out = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)
  return out.reshape(b, t, h, dh)


# ----------------------------------------------------------------------------- blockwise

def _blockwise(q, k, v, mask: Mask, block: int) -> jax.Array:
  b, t, h, dh = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  block = min(block, s)
  keys = -(-s // block) * block
  pad = lambda x: jnp.pad(x, ((0, 0), (0, keys - s), (0, 0), (0, 0)))
  q5 = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  out = _flash(q5, pad(k), pad(v), mask.padded(keys), block)
  return out.reshape(b, t, h, dh)


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, S, ...) -> (S / block, B, block, ...)."""
  return jnp.moveaxis(x.reshape((x.shape[0], -1, block) + x.shape[2:]), 1, 0)


def _block_scores(q5, k_block, mask: Mask, start, block: int):
  """Scaled scores (B, K, G, T, block) float32 with masked keys at _MASKED, and the mask."""
  scores = jnp.einsum('btkgd,bskd->bkgts', q5, k_block, preferred_element_type=jnp.float32)
  allowed = mask.block(start, block)[:, None, None]
  return jnp.where(allowed, scores * q5.shape[-1] ** -0.5, _MASKED), allowed


def _flash_forward(q5, k, v, mask: Mask, block: int):
  """(out (B, T, K, G, Dh), log-sum-exp (B, K, G, T); +inf where nothing is allowed)."""
  b, t, kv_heads, groups, dh = q5.shape

  def step(carry, inputs):
    top, total, acc = carry
    index, k_block, v_block = inputs
    scores, allowed = _block_scores(q5, k_block, mask, index * block, block)
    new_top = jnp.maximum(top, scores.max(-1))
    probs = jnp.exp(scores - new_top[..., None]) * allowed
    rescale = jnp.exp(top - new_top)
    total = total * rescale + probs.sum(-1)
    acc = acc * jnp.moveaxis(rescale, 3, 1)[..., None] + jnp.einsum(
        'bkgts,bskd->btkgd', probs.astype(v_block.dtype), v_block,
        preferred_element_type=jnp.float32)
    return (new_top, total, acc), None

  init = (jnp.full((b, kv_heads, groups, t), _MASKED, jnp.float32),
          jnp.zeros((b, kv_heads, groups, t), jnp.float32),
          jnp.zeros((b, t, kv_heads, groups, dh), jnp.float32))
  blocks = (jnp.arange(k.shape[1] // block), _key_blocks(k, block), _key_blocks(v, block))
  (top, total, acc), _ = jax.lax.scan(step, init, blocks)
  seen = total > 0
  out = acc / jnp.moveaxis(jnp.where(seen, total, 1.0), 3, 1)[..., None]
  lse = jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), jnp.inf)
  return out.astype(q5.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q5, k, v, mask: Mask, block: int):
  return _flash_forward(q5, k, v, mask, block)[0]


def _flash_fwd(q5, k, v, mask, block):
  out, lse = _flash_forward(q5, k, v, mask, block)
  return out, (q5, k, v, mask, out, lse)


def _flash_bwd(block, residuals, d_out):
  q5, k, v, mask, out, lse = residuals
  scale = q5.shape[-1] ** -0.5
  d_out32 = d_out.astype(jnp.float32)
  # D_t = sum_d dO_td O_td = sum_s P_ts dP_ts: the softmax's Jacobian term, per query.
  row = jnp.moveaxis(jnp.sum(d_out32 * out.astype(jnp.float32), -1), 1, 3)  # (B, K, G, T)

  def step(d_q, inputs):
    index, k_block, v_block = inputs
    scores, _ = _block_scores(q5, k_block, mask, index * block, block)
    probs = jnp.exp(scores - lse[..., None])  # 0 where masked or nothing allowed
    d_v = jnp.einsum('bkgts,btkgd->bskd', probs, d_out32)
    d_probs = jnp.einsum('btkgd,bskd->bkgts', d_out32, v_block.astype(jnp.float32))
    d_scores = probs * (d_probs - row[..., None]) * scale
    d_q = d_q + jnp.einsum('bkgts,bskd->btkgd', d_scores, k_block.astype(jnp.float32))
    d_k = jnp.einsum('bkgts,btkgd->bskd', d_scores, q5.astype(jnp.float32))
    return d_q, (d_k, d_v)

  blocks = (jnp.arange(k.shape[1] // block), _key_blocks(k, block), _key_blocks(v, block))
  d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q5.shape, jnp.float32), blocks)
  unblock = lambda x, like: jnp.moveaxis(x, 0, 1).reshape(like.shape).astype(like.dtype)
  zero_mask = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)
  return d_q.astype(q5.dtype), unblock(d_k, k), unblock(d_v, v), zero_mask


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- splash (TPU)

def _splash(q, k, v, mask: Mask) -> jax.Array:
  """Splash attention per (batch) shard. Sequences are padded to whole 128-blocks; the added
  keys get a segment id no query has."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=import-outside-toplevel
      splash_attention_kernel as splash, splash_attention_mask as splash_mask)
  b, t, h, dh = q.shape
  s = k.shape[1]
  pad_len = lambda n: -(-n // _SPLASH_BLOCK) * _SPLASH_BLOCK
  tp, sp = pad_len(t), pad_len(s)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  q_heads = jnp.swapaxes(pad(q * jnp.asarray(dh ** -0.5, q.dtype), tp), 1, 2)  # (B, H, Tp, Dh)
  k_heads, v_heads = (jnp.swapaxes(pad(x, sp), 1, 2) for x in (k, v))
  # Added queries copy the last query's segment: no row is left with nothing allowed.
  q_segment = jnp.pad(mask.q_segment, ((0, 0), (0, tp - t)), mode='edge')
  kv_segment = jnp.pad(mask.kv_segment, ((0, 0), (0, sp - s)), constant_values=-1)
  if mask.causal:
    base = splash_mask.CausalMask((tp, sp))
  else:
    base = splash_mask.FullMask((tp, sp))
  kernel = splash.make_splash_mha(
      splash_mask.MultiHeadMask([base] * h), head_shards=1, q_seq_shards=1,
      block_sizes=splash.BlockSizes(*(min(_SPLASH_BLOCK, n) for n in (tp, sp)),
                                    block_q_dkv=min(_SPLASH_BLOCK, tp),
                                    block_kv_dkv=min(_SPLASH_BLOCK, sp),
                                    block_kv_dkv_compute=min(_SPLASH_BLOCK, sp),
                                    block_q_dq=min(_SPLASH_BLOCK, tp),
                                    block_kv_dq=min(_SPLASH_BLOCK, sp)),
      interpret=platform() != 'tpu')

  def per_shard(q_heads, k_heads, v_heads, q_segment, kv_segment):
    segments = splash.SegmentIds(q=q_segment, kv=kv_segment)
    return jax.vmap(kernel)(q_heads, k_heads, v_heads, segment_ids=segments)

  out = _per_batch_shard(per_shard, q_heads, k_heads, v_heads, q_segment, kv_segment)
  out = jnp.swapaxes(out, 1, 2)[:, :t]
  return jnp.where(mask.any_allowed()[..., None, None], out, 0).astype(q.dtype)


def _per_batch_shard(fn, *args):
  """fn(*args) on each batch shard of the current mesh (`shard_map` over the axes that split
  the batch), or on the whole batch outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(*args)
  from lavi_jax import sharding  # pylint: disable=import-outside-toplevel
  axes = tuple(a for a in sharding.BATCH if a in mesh.axis_names and mesh.shape[a] > 1)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  if not axes or args[0].shape[0] % shards:
    axes = ()
  spec = jax.sharding.PartitionSpec(axes or None)
  return jax.shard_map(fn, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


# ----------------------------------------------------------------------------- cudnn (GPU)

def _cudnn(q, k, v, mask: Mask, implementation: str = 'cudnn') -> jax.Array:
  """`jax.nn.dot_product_attention` with key lengths (and causal) from the mask;
  `implementation='xla'` runs the same call anywhere (tests)."""
  b, t = q.shape[:2]
  out = jax.nn.dot_product_attention(
      q, k, v, is_causal=mask.causal, key_value_seq_lengths=mask.kv_length,
      query_seq_lengths=jnp.full((b,), t, jnp.int32), implementation=implementation)
  return out.astype(q.dtype)
