"""Videos: PyAV decoding with uniform sampling of frames.

Shapes: n = min(num_frames, frames in the video), H x W the video's size, S image side.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Union

import av
import numpy as np
from etils import epath
from PIL import Image

from lavi_jax.data.errors import DataError, describe
from lavi_jax.convert.hf_lavi.pixels import resize, uniform_indices

# A path, encoded bytes (any container PyAV reads) or uint8 frames (F, H, W, 3).
VideoRef = Union[str, os.PathLike, bytes, np.ndarray]


@contextlib.contextmanager
def _open(ref: VideoRef):
  with (io.BytesIO(ref) if isinstance(ref, bytes) else epath.Path(ref).open('rb')) as f:
    with av.open(f) as container:
      yield container


def _count_frames(ref: VideoRef) -> int:
  """Frames of the first video stream: from the header, else by counting packets."""
  with _open(ref) as container:
    stream = container.streams.video[0]
    return stream.frames or sum(1 for p in container.demux(stream) if p.size)


def decode_video(ref: VideoRef, num_frames: int) -> np.ndarray:
  """Decodes `num_frames` uniformly sampled frames (fewer for short videos) -> (n, H, W, 3) uint8.

  Raises DataError for missing, unreadable or truncated videos (fewer decodable frames than the
  container announces).
  """
  if not isinstance(ref, (np.ndarray, bytes, str, os.PathLike)):
    raise DataError(f'video reference {describe(ref)} is not a path, bytes or array')
  if isinstance(ref, np.ndarray):
    if ref.ndim != 4 or ref.shape[-1] != 3 or not len(ref):
      raise DataError(f'video {describe(ref)} must be non-empty uint8 frames (F, H, W, 3)')
    return ref[uniform_indices(len(ref), num_frames)]
  try:
    total = _count_frames(ref)
    if not total:
      raise DataError(f'video {describe(ref)} has no frames')
    wanted = uniform_indices(total, num_frames).tolist()
    frames = []
    with _open(ref) as container:
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      for i, frame in enumerate(container.decode(stream)):
        if i == wanted[len(frames)]:
          frames.append(frame.to_ndarray(format='rgb24'))
          if len(frames) == len(wanted):
            break
  except FileNotFoundError as e:
    raise DataError(f'video {describe(ref)} does not exist') from e
  except IndexError as e:
    raise DataError(f'video {describe(ref)} has no video stream') from e
  except (av.error.FFmpegError, OSError) as e:
    raise DataError(f'video {describe(ref)} cannot be decoded: {e}') from e
  if len(frames) < len(wanted):
    raise DataError(f'video {describe(ref)} is truncated: frame {wanted[len(frames)]} of '
                    f'{total} cannot be decoded')
  return np.stack(frames)


def video_frames(ref: VideoRef, num_frames: int, side: int) -> np.ndarray:
  """Decoded, sampled and resized frames -> (n, S, S, 3) uint8."""
  return np.stack([resize(Image.fromarray(f), side) for f in decode_video(ref, num_frames)])
