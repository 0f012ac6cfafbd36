"""Images: decoding to RGB, SigLIP resizing, LLaVA-OneVision AnyRes crops (the pixel work is
`lavi_jax.convert.hf_lavi.pixels`, which the exported PyTorch processor runs too).

Shapes: S image side (config.model.vision.image_size), n crops. Pixels come out uint8 after a
bicubic resize to S x S (SigLIP's processor); the model normalises them on the device to
[-1, 1] as (x / 255 - 0.5) / 0.5.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from lavi_jax.convert.hf_lavi.pixels import (  # noqa: F401 (the pipeline's names for them)
    DEFAULT_GRIDS, Grid, anyres_crops, resize, select_grid, to_rgb)
from lavi_jax.data.errors import DataError, describe

# A path, encoded bytes, a uint8 array (H, W[, C]) or a Pillow image.
ImageRef = Union[str, os.PathLike, bytes, np.ndarray, Image.Image]


def decode_image(ref: ImageRef) -> Image.Image:
  """Decodes an image reference to an RGB Pillow image (EXIF orientation applied)."""
  if not isinstance(ref, (np.ndarray, Image.Image, bytes, str, os.PathLike)):
    raise DataError(f'image reference {describe(ref)} is not a path, bytes or array')
  try:
    if isinstance(ref, np.ndarray):
      image = Image.fromarray(ref)
    elif isinstance(ref, Image.Image):
      image = ref
    else:
      with io.BytesIO(ref) if isinstance(ref, bytes) else epath.Path(ref).open('rb') as f:
        image = Image.open(f)
        image.load()
      image = ImageOps.exif_transpose(image)
    return to_rgb(image)
  except FileNotFoundError as e:
    raise DataError(f'image {describe(ref)} does not exist') from e
  except (OSError, ValueError, TypeError, SyntaxError) as e:  # Pillow's decode errors
    raise DataError(f'image {describe(ref)} cannot be decoded: {e}') from e