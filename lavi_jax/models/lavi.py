"""LaVi: ViT -> projector -> visual tokens V that modulate the LLM's norms (or, for
`fusion='concat'`, replace each placeholder in the text as in LLaVA).

Shapes: B batch, T text length, F crops/frames, S image side, P tokens per crop/frame,
N visual tokens (all crops/frames of all items), C = d_ctx, V vocabulary.

Visual input: a frame pool (`visual=`, see lavi_jax.models.visual), or per kind (`images=`,
`videos=`) a dict:
  pixel_values (B, F, S, S, 3) uint8, or float in [-1, 1]; frame_mask (B, F) bool (default: all
  valid); frame_item (B, F) int: the item (0-based, in the order of the placeholders in the
  text) each crop/frame belongs to (default: all item 0).
The text has one `image_token_id` / `video_token_id` placeholder per item; text token t sees
only the items whose placeholder is at or before t.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lavi_jax.models.attention import Mask
from lavi_jax.models.llm import LLM
from lavi_jax.models.projector import FrameIndexEmbedding, Projector
from lavi_jax.models.visual import Pool, VisualInput, VisualTokens, pool_from_padded, table_layout
from lavi_jax.models.vit import ViT
from lavi_jax.models.viln import Conditioning, ViLNContext, VisualMemory, token_conditioning

def is_placeholder(input_ids: jax.Array, model: ml_collections.ConfigDict) -> jax.Array:
  """input_ids (B, T) -> (B, T) bool: the token is an image or video placeholder."""
  return (input_ids == model.image_token_id) | (input_ids == model.video_token_id)


def count_items_so_far(input_ids: jax.Array, model: ml_collections.ConfigDict) -> jax.Array:
  """input_ids (B, T) -> (B, T): placeholders at or before each position."""
  return jnp.cumsum(is_placeholder(input_ids, model), axis=1, dtype=jnp.int32)


def item_segments(input_ids, segment_ids, visual: VisualTokens, model) -> jax.Array:
  """Packed rows: the conversation (segment id) of each visual token (B, N), that of its item's
  placeholder; -1 for padding tokens and items without a placeholder."""
  t = input_ids.shape[1]
  placeholder_pos = placeholder_positions(count_items_so_far(input_ids, model), visual.item)
  segment = jnp.take_along_axis(segment_ids, jnp.minimum(placeholder_pos, t - 1), axis=1)
  return jnp.where(visual.mask & (placeholder_pos < t), segment, -1).astype(jnp.int32)


def placeholder_positions(items_so_far: jax.Array, item: jax.Array) -> jax.Array:
  """items_so_far (B, T) (count_items_so_far), item (B, N) -> (B, N): the text position of each
  item's placeholder; T when the item has no placeholder."""
  return jax.vmap(lambda c, k: jnp.searchsorted(c, k + 1, side='left'))(items_so_far, item)


def restart_positions(segment_ids: jax.Array) -> jax.Array:
  """(B, L) segment ids, contiguous and increasing over the valid tokens, 0 on padding -> RoPE
  positions restarting at 0 for each segment (padding: its index past the last segment)."""
  length = segment_ids.shape[1]
  keys = jnp.where(segment_ids > 0, segment_ids, jnp.iinfo(jnp.int32).max)
  first = jax.vmap(lambda k: jnp.searchsorted(k, k, side='left'))(keys)
  return (jnp.arange(length)[None] - first).astype(jnp.int32)


def pool_grid(tokens: jax.Array, stride: int) -> jax.Array:
  """(M, g*g, D) -> (M, ceil(g/stride)^2, D) by bilinear resizing of the token grid."""
  m, p, d = tokens.shape
  g = int(round(p ** 0.5))
  out = -(-g // stride)
  grid = tokens.reshape(m, g, g, d)
  pooled = jax.image.resize(grid, (m, out, out, d), method='bilinear', antialias=False)
  return pooled.reshape(m, out * out, d)


def concat_layout(input_ids, text_mask, visual: VisualTokens, model: ml_collections.ConfigDict):
  """Where each text and visual token goes when placeholders are replaced by their items.

  Returns (text_dest (B, T), visual_dest (B, N), out_pos (B, T), length L = T + N): positions in
  the merged sequence (L for dropped entries: the placeholders themselves, padding visual tokens
  and items without a placeholder), and for each text position the merged position whose logits
  predict the next text token (a placeholder's is its item's last visual token).
  """
  b, t = input_ids.shape
  n = visual.mask.shape[1]
  length = t + n
  items_so_far = count_items_so_far(input_ids, model)
  placeholder = is_placeholder(input_ids, model)
  item_of_token = items_so_far - 1
  tokens_in_item = jnp.sum(visual.mask[:, None, :] & (visual.item[:, None, :] ==
                                                      item_of_token[:, :, None]), axis=-1)
  width = jnp.where(placeholder, tokens_in_item, 1)
  end = jnp.cumsum(width, axis=1)
  start = end - width
  text_dest = jnp.where(placeholder, length, start)
  # Rank of each valid visual token within its item (stable: keeps the given order).
  keys = jnp.where(visual.mask, visual.item, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(keys, axis=1, stable=True)
  sorted_keys = jnp.take_along_axis(keys, order, axis=1)
  first = jax.vmap(lambda k: jnp.searchsorted(k, k, side='left'))(sorted_keys)
  rank = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(jnp.arange(n) - first)
  placeholder_pos = placeholder_positions(items_so_far, visual.item)  # (B, N)
  has_place = visual.mask & (placeholder_pos < t)
  item_start = jnp.take_along_axis(start, jnp.minimum(placeholder_pos, t - 1), axis=1)
  visual_dest = jnp.where(has_place, item_start + rank, length)
  return text_dest, visual_dest, end - 1, length


class LaVi(nn.Module):
  """The LaVi model. `LaVi(config.model)(input_ids, text_mask, images=..., videos=...)`."""
  config: Any  # model config (ml_collections.ConfigDict)

  def setup(self):
    cfg = ml_collections.FrozenConfigDict(self.config)
    self.cfg = cfg
    self.vit = ViT(cfg)
    self.projector = Projector(cfg)
    self.frame_index = FrameIndexEmbedding(cfg)
    self.llm = LLM(cfg)
    if cfg.fusion == 'viln':
      self.viln_context = ViLNContext(cfg)

  def encode_visual(self, images: VisualInput | None = None, videos: VisualInput | None = None,
                    visual: Pool | None = None) -> VisualTokens | None:
    """A frame pool (`visual=`), or padded images and/or videos -> VisualTokens (or None).

    The ViT encodes each of the pool's G * M slots once; video frames also get their pooled
    grid (see lavi_jax.models.visual).
    """
    pool = visual if visual is not None else pool_from_padded(self.cfg, images, videos)
    if pool is None:
      return None
    pixels = pool['pixels']
    g, m = pixels.shape[:2]
    grids = table_layout(self.cfg.vision, 'frame_video' in pool)
    features = self.vit(pixels.reshape((g * m,) + pixels.shape[2:]))  # (G*M, P_img, Dv)
    if len(grids) > 1:
      features = jnp.concatenate([features, pool_grid(features, self.cfg.vision.video_pool)], 1)
    tokens = self.projector(features)
    tokens = self.frame_index(tokens.reshape((g, m) + tokens.shape[1:]), pool['frame_index'])
    return VisualTokens(tokens.reshape(g, -1, tokens.shape[-1]), pool['token_source'],
                        pool['token_mask'], pool['token_item'], grids)

  def visual_memory(self, visual: VisualTokens | None) -> VisualMemory | None:
    """What the ViLN conditioners read from the visual tokens, per sample (fusion='viln')."""
    if visual is None:
      return None
    return self.viln_context(visual)

  def conditioning(self, visual: VisualTokens | None, token_items: jax.Array,
                   token_segments: jax.Array | None = None,
                   visual_segments: jax.Array | None = None) -> Conditioning | None:
    """What the ViLN layers read, for text tokens that have seen `token_items` items (B, T).

    Its visual memory is float32, so that its gradient, summed over every modulated norm (in
    the scan's carry when layers are scanned), accumulates in float32.
    """
    memory = self.visual_memory(visual)
    if memory is None:
      return None
    return token_conditioning(memory, token_items, jnp.float32, token_segments, visual_segments)

  def __call__(self, input_ids, text_mask=None, images: VisualInput | None = None,
               videos: VisualInput | None = None, visual: Pool | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """input_ids (B, T), text_mask (B, T) bool (right padding) -> logits (B, T, V) float32.

    Visual input: a frame pool (`visual`, as training batches carry it) or padded `images` /
    `videos`. Logits at t predict token t + 1 of the text (for concat, placeholders excluded).
    """
    return self.logits(self.hidden(input_ids, text_mask, images, videos, visual, segment_ids))

  def hidden(self, input_ids, text_mask=None, images: VisualInput | None = None,
             videos: VisualInput | None = None, visual: Pool | None = None,
             segment_ids: jax.Array | None = None) -> jax.Array:
    """As `__call__`, but the LLM's final-normed hidden states (B, T, D) that give the logits.

    segment_ids (B, T) int32, packed rows (lavi_jax.data.packing): 0 on padding, 1, 2, ... per
    conversation. Attention stays within a conversation, RoPE positions restart at each, and a
    conversation's text sees only its own visual items (items are numbered per row). None: one
    conversation per row, as before.
    """
    b, t = input_ids.shape
    text_mask = jnp.ones((b, t), bool) if text_mask is None else text_mask.astype(bool)
    visual = self.encode_visual(images, videos, visual)
    packed = segment_ids is not None
    if packed:
      segment_ids = jnp.where(text_mask, segment_ids, 0).astype(jnp.int32)
    if self.cfg.fusion == 'concat' and visual is not None:
      embeds, valid, out_pos = self.concat_inputs(input_ids, text_mask, visual)
      if packed:
        merged = self.concat_segments(input_ids, text_mask, visual, segment_ids)
        positions = restart_positions(merged)
        mask = Mask(q_segment=merged, kv_segment=merged, causal=True)
      else:
        positions = jnp.broadcast_to(jnp.arange(valid.shape[1]), valid.shape)
        mask = Mask.causal_padded(valid)
      hidden = self.llm.hidden_states(embeds, positions, mask)
      return jnp.take_along_axis(hidden, out_pos[:, :, None], axis=1)
    if packed:
      positions = restart_positions(segment_ids)
      mask = Mask(q_segment=segment_ids, kv_segment=segment_ids, causal=True)
    else:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = Mask.causal_padded(text_mask)
    cond = None
    if self.cfg.fusion == 'viln':
      visual_segments = None
      if packed and visual is not None:
        visual_segments = item_segments(input_ids, segment_ids, visual, self.cfg)
      cond = self.conditioning(visual, count_items_so_far(input_ids, self.cfg),
                               segment_ids if packed else None, visual_segments)
    return self.llm.hidden_states(self.llm.embed(input_ids), positions, mask, cond)

  def concat_segments(self, input_ids, text_mask, visual: VisualTokens,
                      segment_ids: jax.Array) -> jax.Array:
    """fusion='concat', packed rows: the segment id of each merged token (B, L), 0 on padding."""
    b, _ = input_ids.shape
    text_dest, visual_dest, _, length = concat_layout(input_ids, text_mask, visual, self.cfg)
    rows = jnp.arange(b)[:, None]
    merged = jnp.zeros((b, length), jnp.int32)
    merged = merged.at[rows, text_dest].set(segment_ids, mode='drop')
    return merged.at[rows, visual_dest].set(
        item_segments(input_ids, segment_ids, visual, self.cfg), mode='drop')

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states (B, T, D) -> logits (B, T, V) float32."""
    return self.llm.logits(hidden)

  def concat_inputs(self, input_ids, text_mask, visual: VisualTokens):
    """fusion='concat': the merged sequence, each placeholder replaced by its item's tokens.

    Returns (embeds (B, L, D), valid (B, L) bool, out_pos (B, T)), L = T + N; see
    `concat_layout` (valid merged tokens are contiguous from position 0).
    """
    b, _ = input_ids.shape
    text_dest, visual_dest, out_pos, length = concat_layout(input_ids, text_mask, visual,
                                                            self.cfg)
    rows = jnp.arange(b)[:, None]
    embeds = self.llm.embed(input_ids)
    merged = jnp.zeros((b, length, embeds.shape[-1]), embeds.dtype)
    merged = merged.at[rows, text_dest].set(embeds, mode='drop')
    merged = merged.at[rows, visual_dest].set(visual.gather().astype(embeds.dtype), mode='drop')
    valid = jnp.zeros((b, length), bool)
    valid = valid.at[rows, text_dest].set(text_mask, mode='drop')
    valid = valid.at[rows, visual_dest].set(True, mode='drop')
    return merged, valid, out_pos


def dummy_inputs(model: ml_collections.ConfigDict, batch: int = 1, text_len: int = 8,
                 frames: int = 1) -> dict[str, Any]:
  """Smallest inputs that touch every parameter (for init and eval_shape)."""
  side = model.vision.image_size
  ids = jnp.zeros((batch, text_len), jnp.int32).at[:, 0].set(model.image_token_id)
  pixels = jnp.zeros((batch, frames, side, side, 3), jnp.float32)
  return dict(input_ids=ids, images=dict(pixel_values=pixels))


def init_params(model: ml_collections.ConfigDict, rng: jax.Array):
  """Boxed (logically partitioned) parameters of LaVi(model); use under jit / eval_shape."""
  return LaVi(model).init(rng, **dummy_inputs(model))['params']


def abstract_params(model: ml_collections.ConfigDict):
  """ShapeDtypeStructs of LaVi(model)'s (unboxed) parameters; nothing is allocated."""
  return jax.eval_shape(lambda: nn.unbox(init_params(model, jax.random.key(0))))
