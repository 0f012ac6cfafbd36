"""Generation requests and results, and one request -> one row of model inputs.

A request is one user turn (`prompt`) with optional images and/or one video. Its visual items
are numbered by the order of their placeholders in the prompt. A prompt without placeholders
gets one `<image>` line per image, then a `<video>` line, before its text (as LLaVA data has
them); a prompt with placeholders must have exactly one per item. The prompt is rendered with
the chat template up to the start of the assistant's answer; a single image gets AnyRes crops,
several images their base crops, a video `num_frames` uniformly sampled frames (the training
transforms, lavi_jax/data/sample.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np

from lavi_jax import config as lavi_config
from lavi_jax.data import chat
from lavi_jax.data.errors import DataError
from lavi_jax.data.image import ImageRef
from lavi_jax.data.sample import ExampleSpec, check_items, load_visual
from lavi_jax.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, Tokenizer
from lavi_jax.data.video import VideoRef
from lavi_jax.inference.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
  """A prompt with optional images and video (paths, or encoded bytes / uint8 frames as
  `data.image.ImageRef` / `data.video.VideoRef`); `sampling` None: the defaults."""
  prompt: str
  images: tuple[ImageRef, ...] = ()
  video: VideoRef | None = None
  id: str = ''
  sampling: SamplingParams | None = None

  @classmethod
  def from_json(cls, record: dict[str, Any], defaults: SamplingParams,
                root: str = '') -> Request:
    """{'prompt', 'images' (a path or a list), 'video', 'id', and any SamplingParams field};
    relative paths are taken from `root`."""
    if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
      raise DataError('a request must be a JSON object with a "prompt" string')
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(record) - fields - {'prompt', 'images', 'video', 'id'}
    if unknown:
      raise DataError(f'unknown request keys {sorted(unknown)}')
    images = record.get('images', [])
    images = [images] if isinstance(images, str) else images
    video = record.get('video')
    if not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
      raise DataError('"images" must be a path or a list of paths')
    if video is not None and not isinstance(video, str):
      raise DataError('"video" must be a path')
    try:
      sampling = dataclasses.replace(defaults, **{k: v for k, v in record.items() if k in fields})
    except (TypeError, ValueError) as e:
      raise DataError(f'bad sampling settings: {e}') from e
    return cls(prompt=record['prompt'], images=tuple(os.path.join(root, p) for p in images),
               video=None if video is None else os.path.join(root, video),
               id=str(record.get('id', '')), sampling=sampling)


@dataclasses.dataclass
class Result:
  """finish_reason: 'stop' (a stop token), 'length' (max_new_tokens or the cache's end) or
  'error' (then `error` says why, naming the request, and nothing was generated)."""
  id: str
  text: str = ''
  token_ids: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str = 'error'
  error: str | None = None


@dataclasses.dataclass
class Prepared:
  """One request as model inputs: input_ids (T,) int32, visual {'images', 'videos'} arrays of
  one row (see sample.load_visual), which kinds it uses, and the cache slots its prompt takes."""
  input_ids: np.ndarray
  visual: dict[str, dict[str, np.ndarray]]
  kinds: tuple[str, ...]
  cache_tokens: int


def with_placeholders(request: Request) -> str:
  """The prompt, with placeholder lines put before it when it has none."""
  if IMAGE_TOKEN in request.prompt or VIDEO_TOKEN in request.prompt:
    return request.prompt
  lines = [IMAGE_TOKEN] * len(request.images) + [VIDEO_TOKEN] * (request.video is not None)
  return '\n'.join(lines + [request.prompt])


def prepare(request: Request, tokenizer: Tokenizer, template: chat.ChatTemplate,
            spec: ExampleSpec, model: ml_collections.ConfigDict, max_len: int) -> Prepared:
  """Builds a request's inputs; raises DataError (empty prompt, wrong placeholders, a missing
  or unreadable file, a prompt that leaves no room in a cache of `max_len` slots)."""
  if not request.prompt.strip():
    raise DataError('the prompt is empty')
  videos = [] if request.video is None else [request.video]
  prompt = with_placeholders(request)
  check_items(prompt, list(request.images), videos, spec)
  ids = chat.tokenize_prompt([{'from': 'human', 'value': prompt}], tokenizer, template)
  kinds = [i for i in ids.tolist() if i in (tokenizer.image_id, tokenizer.video_id)]
  image_items = [k for k, i in enumerate(kinds) if i == tokenizer.image_id]
  video_items = [k for k, i in enumerate(kinds) if i == tokenizer.video_id]
  visual = load_visual(spec, list(request.images), image_items, videos, video_items,
                       anyres=len(request.images) == 1)
  cache_tokens = len(ids)
  if model.fusion == 'concat':  # each placeholder becomes its item's visual tokens
    for kind, video in (('images', False), ('videos', True)):
      if kind in visual:
        per_frame = lavi_config.num_visual_tokens_per_frame(model.vision, video)
        cache_tokens += int(visual[kind]['frame_mask'].sum()) * per_frame
    cache_tokens -= len(kinds)
  if cache_tokens >= max_len:
    raise DataError(f'the prompt takes {cache_tokens} cache slots, but the cache holds '
                    f'{max_len} (prompt and answer together; raise max_len)')
  used = tuple(k for k, refs in (('images', request.images), ('videos', videos)) if refs)
  return Prepared(ids, visual, used, cache_tokens)
