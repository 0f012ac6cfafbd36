"""Visual inputs as a frame pool: the vision tower sees only the crops and frames rows really have.

Shapes: B batch, G row groups (B % G == 0; rows b*B/G .. of group b, contiguous), M frame slots
per group, S image side, P tokens per slot (`table_layout`), N visual token slots per row,
C = d_ctx.

A pool (the `visual=` input of `LaVi`, built on the host by `lavi_jax.data.visual_pool`):
  pixels (G, M, S, S, 3) uint8 (or float in [-1, 1]): the crops and video frames of a group's
    rows, packed; unused slots are zeros
  frame_index (G, M) int32: index of the crop/frame within its item (frame-index embedding)
  frame_video (G, M) bool: a video frame (pooled after the ViT); absent when no slot can hold one
  frame_valid (G, M) bool: the slot holds a real crop/frame (for counting work; not read here)
  token_source (B, N) int32: per visual token slot of a row, its index into the row's group table
    (slot m, token p -> m * P + p, see `table_layout`)
  token_mask (B, N) bool: the slot holds a token; token_item (B, N) int32: its item (placeholder
    order in the row's text)

Each slot's encoded tokens form a table of P = P_img (+ P_vid pooled video tokens, when the pool
has video frames and `vision.video_pool` > 1); rows gather their tokens from their group's table,
so the conditioners and the concat sequence see N tokens per row whatever the group holds.
The padded per-kind inputs (`images=` / `videos=`, (B, F, ...) per row) are the special case of
one group per row (`pool_from_padded`).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lavi_jax import config as lavi_config

VisualInput = dict[str, jax.Array]
Pool = dict[str, jax.Array]


@flax.struct.dataclass
class VisualTokens:
  """Encoded visual tokens of a batch.

  table (G, M * P, C): every slot's tokens; source, mask, item (B, N): each row's token slots
  (see module docstring); grids: static ((h, w), ...) token grids making up a slot's P tokens.
  """
  table: jax.Array
  source: jax.Array
  mask: jax.Array
  item: jax.Array
  grids: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False)

  def gather(self, table: jax.Array | None = None) -> jax.Array:
    """Each row's tokens (B, N, C) from `table` (G, M * P, C) (default: the encoded tokens)."""
    return gather_rows(self.table if table is None else table, self.source)


def gather_rows(table: jax.Array, source: jax.Array) -> jax.Array:
  """table (G, K, C), source (B, N) indices into the row's group -> (B, N, C).

  A gather batched over groups, so each group's rows stay on the devices holding the group.
  """
  g = table.shape[0]
  b, n = source.shape
  rows = jax.vmap(lambda t, s: jnp.take(t, s, axis=0))(table, source.reshape(g, b // g, n))
  return rows.reshape(b, n, table.shape[-1])


def table_layout(vision: ml_collections.ConfigDict, has_video: bool) -> tuple[tuple[int, int], ...]:
  """Token grids ((h, w), ...) of one slot's table entry: the ViT's grid, then the pooled video
  grid when video frames are pooled."""
  side = vision.image_size // vision.patch_size
  grids = ((side, side),)
  if has_video and vision.video_pool > 1:
    pooled = -(-side // vision.video_pool)
    grids += ((pooled, pooled),)
  return grids


def video_token_offset(vision: ml_collections.ConfigDict) -> int:
  """Where a video frame's tokens start in its slot's table entry (pooled or not)."""
  return table_layout(vision, True)[0][0] ** 2 if vision.video_pool > 1 else 0


def index_within_item(frame_item: jax.Array) -> jax.Array:
  """frame_item (..., F) -> (..., F): how many earlier frames belong to the same item."""
  same = frame_item[..., :, None] == frame_item[..., None, :]
  earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), k=-1)
  return jnp.sum(same & earlier, axis=-1)


def pool_from_padded(model: ml_collections.ConfigDict, images: VisualInput | None,
                     videos: VisualInput | None) -> Pool | None:
  """Per-kind padded inputs (pixel_values (B, F, S, S, 3), frame_mask, frame_item (B, F)) ->
  a pool of one group per row (images first, then videos), or None without visual input."""
  kinds = [(v, video) for v, video in ((images, False), (videos, True)) if v is not None]
  if not kinds:
    return None
  vision = model.vision
  has_video = videos is not None
  per_slot = sum(h * w for h, w in table_layout(vision, has_video))
  pixels, index, video_flags, source, mask, item = [], [], [], [], [], []
  first_slot = 0
  for visual, video in kinds:
    b, f = visual['pixel_values'].shape[:2]
    frame_mask = visual.get('frame_mask', jnp.ones((b, f), bool))
    frame_item = visual.get('frame_item', jnp.zeros((b, f), jnp.int32))
    p = lavi_config.num_visual_tokens_per_frame(vision, video)
    offset = video_token_offset(vision) if video else 0
    slots = first_slot + np.arange(f)[:, None]
    source.append(np.broadcast_to((slots * per_slot + offset + np.arange(p)).reshape(-1),
                                  (b, f * p)))
    pixels.append(visual['pixel_values'])
    index.append(index_within_item(frame_item))
    video_flags.append(jnp.full((b, f), video))
    mask.append(jnp.repeat(frame_mask, p, axis=1))
    item.append(jnp.repeat(frame_item, p, axis=1))
    first_slot += f
  pool = dict(pixels=jnp.concatenate(pixels, 1), frame_index=jnp.concatenate(index, 1),
              token_source=jnp.asarray(np.concatenate(source, 1), jnp.int32),
              token_mask=jnp.concatenate(mask, 1), token_item=jnp.concatenate(item, 1))
  if has_video:
    pool['frame_video'] = jnp.concatenate(video_flags, 1)
  return pool

