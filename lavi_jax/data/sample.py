"""Raw records -> fixed-shape examples (tokenized text with targets, padded crops and frames).

A raw record, what every source returns, is a dict:
  id             str; origin: str, where it comes from (file and line, dataset and index)
  conversations  LLaVA turns [{'from': 'human' | 'gpt', 'value': str}]
  images         one image (path, encoded bytes, uint8 array) per `<image>` placeholder
  videos         one video (path, encoded bytes, uint8 frames (F, H, W, 3)) per `<video>`
  question_type  int, index into synthetic.QUESTION_TYPES (-1: none)

An example, with T = max_text_len, S = image side, n the record's crops and frames:
  input_ids (T,) int32, text_mask (T,) bool (right padding), targets (T,) int32 (the next token;
  0 past the end), loss_mask (T,) bool (targets[t] belongs to an assistant answer),
  frames (n, S, S, 3) uint8, frame_item (n,) int32, frame_video (n,) bool: the record's crops
  and frames in item order, with no padding (batches pack them: lavi_jax.data.visual_pool),
  question_type () int32, num_truncated () int32 (1 when trailing turns were dropped).
Visual items (images and videos together) are numbered by the order of their placeholders in
the text; frame_item gives each crop/frame its item. Generation reads the same items padded
per kind (`load_visual`: Fi / Fv image / video frames, `ExampleSpec`). The image of a
single-image record gets AnyRes crops; each image of a multi-image record gets its base crop
only (as LLaVA-OneVision).
Items whose placeholders were truncated away are not loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from absl import logging

from lavi_jax.data import chat, image, video
from lavi_jax.data.errors import DataError
from lavi_jax.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, Tokenizer


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """Fixed example shapes and visual processing."""
  max_text_len: int  # T
  image_size: int  # S
  max_crops: int  # AnyRes crops of a single image, base crop included (1: base crop only)
  max_images: int  # images per record
  grids: tuple[tuple[int, int], ...]  # AnyRes (rows, cols) candidates
  num_frames: int  # Fv, frames of the (at most one) video; 0: no videos

  @property
  def image_frames(self) -> int:  # Fi
    return max(self.max_crops, self.max_images)


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in for a bad record when bad records are skipped (pipeline counts and drops it)."""
  reason: str


def _padded(frames: list[np.ndarray], items: list[int], count: int, side: int) -> dict:
  """Per-item frames (n_k, S, S, 3) -> padded pixel_values (count, S, S, 3), mask, item."""
  pixels = np.zeros((count, side, side, 3), np.uint8)
  mask = np.zeros(count, bool)
  item = np.zeros(count, np.int32)
  n = 0
  for f, k in zip(frames, items):
    pixels[n:n + len(f)], mask[n:n + len(f)], item[n:n + len(f)] = f, True, k
    n += len(f)
  return dict(pixel_values=pixels, frame_mask=mask, frame_item=item)


def check_items(text: str, images: list, videos: list, spec: ExampleSpec):
  """Raises DataError unless `text` has one placeholder per item and the items fit `spec`."""
  for token, refs in ((IMAGE_TOKEN, images), (VIDEO_TOKEN, videos)):
    if text.count(token) != len(refs):
      raise DataError(f'{text.count(token)} {token} placeholders but {len(refs)} '
                      f'{token[1:-1]}s')
  if len(images) > spec.max_images:
    raise DataError(f'{len(images)} images, more than data.max_images={spec.max_images}')
  if len(videos) > (1 if spec.num_frames else 0):
    raise DataError(f'{len(videos)} videos; at most one video per record is supported, and '
                    'only with data.num_frames > 0')


def decode_items(spec: ExampleSpec, images: list, image_items: list[int], videos: list,
                 video_items: list[int], anyres: bool) -> dict[str, list]:
  """Decodes visual items: {'images': [(n, S, S, 3) uint8 per image], 'videos': [...]}.

  images / videos: references, with their item indices (placeholder order) in image_items /
  video_items. With `anyres` the images get AnyRes crops, else their base crop only.
  Raises DataError for a missing or unreadable file.
  """
  side = spec.image_size
  decoded = [image.decode_image(ref) for ref in images]
  if anyres:
    crops = [image.anyres_crops(x, side, spec.grids, spec.max_crops) for x in decoded]
  else:
    crops = [image.resize(x, side)[None] for x in decoded]
  frames = [video.video_frames(ref, spec.num_frames, side) for ref in videos]
  return {'images': crops, 'videos': frames}


def load_visual(spec: ExampleSpec, images: list, image_items: list[int], videos: list,
                video_items: list[int], anyres: bool) -> dict[str, dict[str, np.ndarray]]:
  """`decode_items` padded per kind: {'images': pixel_values (Fi, S, S, 3) uint8, frame_mask,
  frame_item (Fi,); 'videos': the same with Fv frames (when Fv > 0)}."""
  decoded = decode_items(spec, images, image_items, videos, video_items, anyres)
  out = {'images': _padded(decoded['images'], image_items, spec.image_frames, spec.image_size)}
  if spec.num_frames:
    out['videos'] = _padded(decoded['videos'], video_items, spec.num_frames, spec.image_size)
  return out


def frame_arrays(decoded: dict[str, list], image_items: list[int],
                 video_items: list[int], side: int) -> dict[str, np.ndarray]:
  """`decode_items` as one record's frames in item order: frames (n, S, S, 3) uint8,
  frame_item (n,) int32, frame_video (n,) bool."""
  parts = sorted([(k, f, False) for k, f in zip(image_items, decoded['images'])] +
                 [(k, f, True) for k, f in zip(video_items, decoded['videos'])],
                 key=lambda part: part[0])
  frames = [f for _, f, _ in parts]
  return dict(
      frames=np.concatenate(frames) if frames else np.zeros((0, side, side, 3), np.uint8),
      frame_item=np.array([k for k, f, _ in parts for _ in f], np.int32),
      frame_video=np.array([v for _, f, v in parts for _ in f], bool))


class Preprocess(grain.transforms.Map):
  """grain Map: raw record -> example. A DataError is re-raised naming the record, or, with
  `skip_bad_records`, logged and returned as `Skipped`."""

  def __init__(self, spec: ExampleSpec, tokenizer: Tokenizer, template: chat.ChatTemplate,
               skip_bad_records: bool = False):
    self.spec, self.tokenizer, self.template = spec, tokenizer, template
    self.skip_bad_records = skip_bad_records

  def map(self, record: dict[str, Any]) -> dict[str, Any] | Skipped:
    try:
      return self.example(record)
    except DataError as e:
      message = f"{record.get('origin', '?')} (id {record.get('id')!r}): {e}"
      if not self.skip_bad_records:
        raise DataError(message) from e
      logging.warning('skipping bad record: %s', message)
      return Skipped(message)

  def example(self, record: dict[str, Any]) -> dict[str, Any]:
    spec, tokenizer = self.spec, self.tokenizer
    tokenized = chat.tokenize_chat(record['conversations'], tokenizer, self.template,
                                   spec.max_text_len)
    images, videos = list(record['images']), list(record['videos'])
    check_items(''.join(turn['value'] for turn in record['conversations']), images, videos,
                spec)
    # Items whose placeholders survived truncation, in text order.
    placeholders = (tokenizer.image_id, tokenizer.video_id)
    kinds = [i for i in tokenized.ids.tolist() if i in placeholders]
    image_items = [k for k, i in enumerate(kinds) if i == tokenizer.image_id]
    video_items = [k for k, i in enumerate(kinds) if i == tokenizer.video_id]
    decoded = decode_items(spec, images[:len(image_items)], image_items,
                           videos[:len(video_items)], video_items, anyres=len(images) == 1)
    example = self.text_arrays(tokenized)
    example.update(frame_arrays(decoded, image_items, video_items, spec.image_size))
    example['question_type'] = np.int32(record['question_type'])
    example['num_truncated'] = np.int32(tokenized.truncated)
    return example

  def text_arrays(self, tokenized: chat.TokenizedChat) -> dict[str, np.ndarray]:
    t, n = self.spec.max_text_len, len(tokenized.ids)
    input_ids = np.full(t, self.tokenizer.pad_id, np.int32)
    input_ids[:n] = tokenized.ids
    targets = np.zeros(t, np.int32)
    targets[:n - 1] = tokenized.ids[1:]
    loss_mask = np.zeros(t, bool)
    loss_mask[:n - 1] = tokenized.answer_mask[1:]
    return dict(input_ids=input_ids, text_mask=np.arange(t) < n, targets=targets,
                loss_mask=loss_mask)
