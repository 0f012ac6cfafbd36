"""LaVi's processor: the tokenizer (with the chat template) and an image processor that prepares
images and videos as LaVi's data pipeline does (lavi_jax/data/image.py, video.py, sample.py).

    processor = AutoProcessor.from_pretrained(EXPORT_DIR, trust_remote_code=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[image])   # or videos=[video]

Images: RGB (transparency on white, 16-bit scaled, EXIF orientation applied), then LLaVA-
OneVision AnyRes when a prompt has a single image (the base crop, the whole image resized to
S x S bicubic, then the crops of the best grid with rows * cols + 1 <= max_crops), else the base
crop of each. Videos: `num_frames` frames at linspace(0, total - 1) rounded down, each resized to
S x S bicubic. Pixels are then SigLIP-normalised ((x / 255 - 0.5) / 0.5), channels first, and
padded per kind: `pixel_values` (B, Fi, 3, S, S), `image_frame_mask` (B, Fi),
`image_frame_item` (B, Fi) (each crop's item: its placeholder's rank among the row's
`<image>` / `<video>` placeholders), and `pixel_values_videos`, `video_frame_mask`,
`video_frame_item` (B, Fv). Images are PIL images, uint8 arrays (H, W[, C]), paths or encoded
bytes; videos uint8 arrays (F, H, W, 3), paths / bytes of a video file (decoded with PyAV),
or lists of frames (then given per row: `videos=[[frames]]`).
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import ChannelDimension
from transformers.processing_utils import ProcessorMixin

from .pixels import DEFAULT_GRIDS, anyres_crops, resize, to_rgb, uniform_indices

IMAGE_TOKEN, VIDEO_TOKEN = '<image>', '<video>'


def decode_image(image) -> Image.Image:
  """data.image.decode_image: a PIL image, uint8 array, path or bytes -> RGB PIL image."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    with io.BytesIO(image) if isinstance(image, bytes) else open(image, 'rb') as f:
      image = Image.open(f)
      image.load()
    image = ImageOps.exif_transpose(image)
  return to_rgb(image)


def decode_video(video, num_frames: int) -> np.ndarray:
  """data.video.decode_video: uniformly sampled frames -> (n, H, W, 3) uint8."""
  if not isinstance(video, (str, os.PathLike, bytes)):
    frames = np.stack([np.asarray(f, np.uint8) for f in video])
    return frames[uniform_indices(len(frames), num_frames)]
  import av  # only for video files

  def container():
    return av.open(io.BytesIO(video) if isinstance(video, bytes) else os.fspath(video))

  with container() as c:
    stream = c.streams.video[0]
    total = stream.frames or sum(1 for p in c.demux(stream) if p.size)
  wanted = uniform_indices(total, num_frames).tolist()
  frames = []
  with container() as c:
    for i, frame in enumerate(c.decode(c.streams.video[0])):
      if i == wanted[len(frames)]:
        frames.append(frame.to_ndarray(format='rgb24'))
        if len(frames) == len(wanted):
          break
  if len(frames) < len(wanted):
    raise ValueError(f'the video is truncated: frame {wanted[len(frames)]} of {total} cannot be '
                     'decoded')
  return np.stack(frames)


class LaViImageProcessor(BaseImageProcessor):
  """Images and videos -> LaVi's padded pixel inputs (see the module docstring)."""

  model_input_names = ['pixel_values', 'image_frame_mask', 'image_frame_item',
                       'pixel_values_videos', 'video_frame_mask', 'video_frame_item']

  def __init__(self, size: int = 384, grids=DEFAULT_GRIDS, max_crops: int = 10,
               num_frames: int = 8, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
               rescale_factor: float = 1 / 255, **kwargs):
    super().__init__(**kwargs)
    self.size, self.grids, self.max_crops, self.num_frames = size, grids, max_crops, num_frames
    self.image_mean, self.image_std = list(image_mean), list(image_std)
    self.rescale_factor = rescale_factor

  def image_crops(self, image, anyres: bool) -> np.ndarray:
    """One image -> (n, S, S, 3) uint8: AnyRes crops, or the base crop only."""
    image = decode_image(image)
    if anyres:
      return anyres_crops(image, self.size, [tuple(g) for g in self.grids], self.max_crops)
    return resize(image, self.size)[None]

  def video_frames(self, video) -> np.ndarray:
    """One video -> (n, S, S, 3) uint8 (data.video.video_frames)."""
    return np.stack([resize(Image.fromarray(f), self.size)
                     for f in decode_video(video, self.num_frames)])

  def pixels(self, frames: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float32, SigLIP-normalised."""
    return np.stack([
        self.normalize(self.rescale(f, self.rescale_factor, input_data_format='channels_last'),
                       self.image_mean, self.image_std, data_format=ChannelDimension.FIRST,
                       input_data_format=ChannelDimension.LAST) for f in frames]).astype(np.float32)

  def padded(self, rows: list[list[np.ndarray]], items: list[list[int]]) -> tuple[np.ndarray, ...]:
    """Per row, per item frames (n_k, S, S, 3) -> pixels (B, F, 3, S, S), mask, item (B, F)."""
    count = max(sum(len(f) for f in row) for row in rows)
    side = self.size
    pixels = np.zeros((len(rows), count, 3, side, side), np.float32)
    mask = np.zeros((len(rows), count), bool)
    item = np.zeros((len(rows), count), np.int64)
    for b, (row, row_items) in enumerate(zip(rows, items)):
      n = 0
      for frames, k in zip(row, row_items):
        pixels[b, n:n + len(frames)] = self.pixels(frames)
        mask[b, n:n + len(frames)], item[b, n:n + len(frames)] = True, k
        n += len(frames)
    return pixels, mask, item

  def preprocess(self, images=None, videos=None, image_items=None, video_items=None,
                 return_tensors=None, **kwargs) -> BatchFeature:
    """images / videos: a list per row; *_items: each one's item index in its row (default:
    the images, then the videos). A row with a single image gets AnyRes crops."""
    rows = len(images if images is not None else videos)
    images = images if images is not None else [[] for _ in range(rows)]
    videos = videos if videos is not None else [[] for _ in range(rows)]
    if image_items is None:
      image_items = [list(range(len(i))) for i in images]
    if video_items is None:
      video_items = [list(range(len(i), len(i) + len(v))) for i, v in zip(images, videos)]
    data = {}
    if any(images):
      crops = [[self.image_crops(x, anyres=len(row) == 1) for x in row] for row in images]
      data.update(zip(self.model_input_names[:3], self.padded(crops, image_items)))
    if any(videos):
      frames = [[self.video_frames(v) for v in row] for row in videos]
      data.update(zip(self.model_input_names[3:], self.padded(frames, video_items)))
    return BatchFeature(data, tensor_type=return_tensors)


def per_row(values, counts: list[int], name: str) -> list[list]:
  """images / videos as given (one, a flat list in placeholder order, or a list per row) -> a
  list per row, checked against the rows' placeholder counts."""
  if values is None:
    values = []
  elif not isinstance(values, (list, tuple)):
    values = [values]
  rows = None
  if len(values) == len(counts) and all(isinstance(v, (list, tuple)) for v in values):
    rows = [list(v) for v in values]
  elif len(values) == sum(counts):
    starts = np.cumsum([0] + counts)
    rows = [list(values[s:e]) for s, e in zip(starts[:-1], starts[1:])]
  if rows is None or [len(r) for r in rows] != counts:
    raise ValueError(f'the prompts have {counts} {name[:-1]} placeholders per row, but the '
                     f'{name} given do not match them')
  return rows


class LaViProcessor(ProcessorMixin):
  """Tokenizer + LaViImageProcessor. The chat template defaults to the tokenizer's."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    if chat_template is None:
      chat_template = getattr(tokenizer, 'chat_template', None)
    super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

  def __call__(self, text=None, images=None, videos=None, return_tensors='pt',
               **kwargs) -> BatchFeature:
    """text: a prompt or a list (one per row); images / videos: one, a flat list in
    placeholder order, or a list per row. Returns input_ids, attention_mask (the tokenizer's
    padding side: left for generation) and the pixel inputs. The chat template writes the
    BOS token where the model needs one, so no special tokens are added here."""
    texts = [text] if isinstance(text, str) else list(text)
    kwargs.setdefault('add_special_tokens', False)
    kwargs.setdefault('padding', True)
    encoded = self.tokenizer(texts, return_tensors='np', **kwargs)
    ids_of = self.tokenizer.convert_tokens_to_ids
    image_id, video_id = ids_of(IMAGE_TOKEN), ids_of(VIDEO_TOKEN)
    kinds = [[i for i, m in zip(row, mask) if m and i in (image_id, video_id)]
             for row, mask in zip(encoded['input_ids'], encoded['attention_mask'])]
    image_items = [[k for k, i in enumerate(row) if i == image_id] for row in kinds]
    video_items = [[k for k, i in enumerate(row) if i == video_id] for row in kinds]
    images = per_row(images, [len(r) for r in image_items], 'images')
    videos = per_row(videos, [len(r) for r in video_items], 'videos')
    data = dict(encoded)
    if any(images) or any(videos):
      data.update(self.image_processor(images=images, videos=videos, image_items=image_items,
                                       video_items=video_items))
    return BatchFeature(data, tensor_type=return_tensors)

  @property
  def model_input_names(self):
    return self.tokenizer.model_input_names + self.image_processor.model_input_names
