"""Batching examples' crops and frames into frame pools: padding-free visual batches.

Shapes: B rows, G row groups (B % G == 0), g = B / G rows per group, M frame slots per group,
N visual token slots per row, S image side; see lavi_jax.models.visual for the pool's fields.

Each example carries only the crops and frames its record has (`frames` (n, S, S, 3) uint8 and
per frame `frame_item`, `frame_video`). A batch packs the frames of a group's rows into the
group's M slots (M = ceil(g * data.frames_per_row)), so the vision tower runs on M slots per g
rows instead of g times the largest record. Groups are contiguous blocks of rows, one (or more)
per device and accumulation micro-batch, so a device only reads its own rows' frames.

When a group's records need more slots than it has (or a row more than N token slots), rows are
trimmed in order, and counted in `num_visual_trimmed`: an AnyRes image keeps its base crop only,
then a video keeps fewer, uniformly spaced frames. Every item keeps at least one frame; a batch
where even that does not fit is a DataError naming the key to raise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from lavi_jax import config as lavi_config
from lavi_jax.data.errors import DataError
from lavi_jax.models import visual as visual_lib


@dataclasses.dataclass(frozen=True)
class PoolSpec:
  """Static shapes of a batch's pool and each slot's token layout."""
  rows: int  # B
  groups: int  # G
  slots: int  # M per group
  tokens_per_row: int  # N
  image_size: int  # S
  has_video: bool  # the pool may hold video frames (frame_video present)
  tokens_per_slot: int  # P: the table entry of one slot
  image_tokens: int  # tokens of an image crop
  video_tokens: int  # tokens of a video frame
  video_offset: int  # where a video frame's tokens start in its slot's entry

  def tokens_of(self, video: bool) -> int:
    return self.video_tokens if video else self.image_tokens


def pool_spec(config: ml_collections.ConfigDict, rows: int, groups: int) -> PoolSpec:
  """The pool of a batch of `rows` rows in `groups` groups, from data.frames_per_row and
  data.tokens_per_row (0: as much as the largest record of one kind needs)."""
  data, vision = config.data, config.model.vision
  if groups < 1 or rows % groups:
    raise ValueError(f'{rows} rows cannot be split into {groups} visual groups')
  image_frames, video_frames = max(data.max_crops, data.max_images), data.num_frames
  image_tokens = lavi_config.num_visual_tokens_per_frame(vision, False)
  video_tokens = lavi_config.num_visual_tokens_per_frame(vision, True)
  per_row = data.frames_per_row or max(image_frames, video_frames)
  tokens = data.tokens_per_row or max(image_frames * image_tokens, video_frames * video_tokens)
  has_video = video_frames > 0
  return PoolSpec(
      rows=rows, groups=groups, slots=math.ceil(rows // groups * per_row), tokens_per_row=tokens,
      image_size=vision.image_size, has_video=has_video,
      tokens_per_slot=sum(h * w for h, w in visual_lib.table_layout(vision, has_video)),
      image_tokens=image_tokens, video_tokens=video_tokens,
      video_offset=visual_lib.video_token_offset(vision))


def abstract_pool(spec: PoolSpec) -> dict[str, jax.ShapeDtypeStruct]:
  """jax.ShapeDtypeStruct of every pool entry."""
  g, m, b, n, s = spec.groups, spec.slots, spec.rows, spec.tokens_per_row, spec.image_size
  out = dict(pixels=jax.ShapeDtypeStruct((g, m, s, s, 3), np.uint8),
             frame_index=jax.ShapeDtypeStruct((g, m), np.int32),
             frame_valid=jax.ShapeDtypeStruct((g, m), np.bool_),
             token_source=jax.ShapeDtypeStruct((b, n), np.int32),
             token_mask=jax.ShapeDtypeStruct((b, n), np.bool_),
             token_item=jax.ShapeDtypeStruct((b, n), np.int32))
  if spec.has_video:
    out['frame_video'] = jax.ShapeDtypeStruct((g, m), np.bool_)
  return out


def _kept(count: int, video: bool, keep: int) -> np.ndarray:
  """Indices of the frames an item keeps: all, else (image) its base crop or (video) `keep`
  uniformly spaced frames."""
  if keep >= count:
    return np.arange(count)
  return np.linspace(0, count - 1, keep).round().astype(int) if video else np.arange(1)


def fit_row(items: Sequence[tuple[int, bool]], slots: int, tokens: int,
            spec: PoolSpec) -> list[np.ndarray]:
  """Frames each item of a row keeps so that the row uses at most `slots` slots and `tokens`
  token slots. items: (frames, is_video) per item. Raises DataError when one frame per item
  does not fit."""
  keep = [n for n, _ in items]

  def kept():
    return [_kept(n, video, k) for (n, video), k in zip(items, keep)]

  def fits():
    frames = kept()
    used_tokens = sum(len(f) * spec.tokens_of(video) for f, (_, video) in zip(frames, items))
    return sum(len(f) for f in frames) <= slots and used_tokens <= tokens

  for video_pass in (False, True):  # AnyRes images to their base crop, then fewer video frames
    for i, (n, video) in enumerate(items):
      if video != video_pass:
        continue
      while not fits() and keep[i] > 1:
        keep[i] = 1 if not video else keep[i] - 1
  if not fits():
    raise DataError(f'{len(items)} visual items do not fit a row even at one frame each '
                    f'({slots} frame slots, {tokens} token slots left); raise '
                    'data.frames_per_row or data.tokens_per_row')
  return kept()


def pack(examples: Sequence[dict[str, Any]], spec: PoolSpec) -> tuple[dict[str, np.ndarray],
                                                                      np.ndarray]:
  """Examples' frames -> (pool arrays, num_visual_trimmed (B,) int32)."""
  m, n = spec.slots, spec.tokens_per_row
  per_group = spec.rows // spec.groups
  pool = {k: np.zeros(v.shape, v.dtype) for k, v in abstract_pool(spec).items()}
  trimmed = np.zeros(spec.rows, np.int32)
  for row, example in enumerate(examples):
    group, in_group = divmod(row, per_group)
    if in_group == 0:
      used = 0  # slots of the group filled so far
    later = examples[row + 1:(group + 1) * per_group]
    reserve = sum(len(np.unique(e['frame_item'])) for e in later)  # one slot per later item
    frames, items, video = example['frames'], example['frame_item'], example['frame_video']
    item_ids = list(dict.fromkeys(items.tolist()))  # items in frame order
    members = [np.flatnonzero(items == k) for k in item_ids]
    shapes = [(len(f), bool(video[f[0]])) for f in members]
    kept = fit_row(shapes, m - used - reserve, n, spec)
    trimmed[row] = sum(len(k) < len(f) for k, f in zip(kept, members))
    token = 0
    for item, frame_ids, keep, (_, is_video) in zip(item_ids, members, kept, shapes):
      per_frame = spec.tokens_of(is_video)
      offset = spec.video_offset if is_video else 0
      for index, frame in enumerate(frame_ids[keep]):
        pool['pixels'][group, used] = frames[frame]
        pool['frame_index'][group, used] = index
        pool['frame_valid'][group, used] = True
        if spec.has_video:
          pool['frame_video'][group, used] = is_video
        first = used * spec.tokens_per_slot + offset
        pool['token_source'][row, token:token + per_frame] = first + np.arange(per_frame)
        pool['token_mask'][row, token:token + per_frame] = True
        pool['token_item'][row, token:token + per_frame] = item
        token += per_frame
        used += 1
  return pool, trimmed
