"""Pixels of images and video frames, in numpy and Pillow only: shared by the data pipeline
(`lavi_jax.data.image`, `lavi_jax.data.video`) and the exported PyTorch processor
(`processing_lavi.py`, next to which `convert.to_torch` copies this file), so that both prepare
the same pixels.

Shapes: S image side, n crops. Pixels come out uint8 after a bicubic resize to S x S (SigLIP's
processor); the model normalises them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

Grid = tuple[int, int]  # (rows, cols) of S x S crops

# LLaVA-OneVision's grid pinpoints up to 3 x 3 crops (its 384-pixel multiples).
DEFAULT_GRIDS = tuple((r, c) for r in range(1, 4) for c in range(1, 4))


def to_rgb(image: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB: grey and palette expanded, transparency composited on
  white, 16-bit ('I;16*', 'I') scaled by 1/257."""
  if image.mode.startswith('I;16') or image.mode == 'I':
    values = np.asarray(image, np.float64) / 257.0
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), 'L')
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert('RGB')
  return image.convert('RGB')


def resize(image: Image.Image, side: int) -> np.ndarray:
  """RGB image -> (S, S, 3) uint8 (bicubic resize, as SigLIP; the model normalises)."""
  if image.size != (side, side):
    image = image.resize((side, side), Image.Resampling.BICUBIC)
  return np.asarray(image, np.uint8)


def select_grid(width: int, height: int, grids: Sequence[Grid], side: int) -> Grid:
  """LLaVA-NeXT's `select_best_resolution` over the resolutions (cols * S, rows * S): the grid
  that keeps the most of the image's pixels when it is scaled to fit, ties broken by the least
  padding (then by order in `grids`)."""
  best, best_key = None, None
  for rows, cols in grids:
    scale = min(cols * side / width, rows * side / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    key = (effective, -(cols * side * rows * side - effective))
    if best_key is None or key > best_key:
      best, best_key = (rows, cols), key
  return best


def anyres_crops(image: Image.Image, side: int, grids: Sequence[Grid],
                 max_crops: int) -> np.ndarray:
  """LLaVA-OneVision AnyRes -> (n, S, S, 3), n <= max_crops.

  Crop 0 is the whole image resized to S x S (the base crop). With max_crops > 1, the image is
  also resized (aspect ratio kept) to fit the best grid of `select_grid` among those with
  rows * cols + 1 <= max_crops, centred on black, and cut row by row into S x S crops.
  """
  base = resize(image, side)[None]
  allowed = [g for g in grids if g[0] * g[1] + 1 <= max_crops]
  if not allowed:
    return base
  width, height = image.size
  rows, cols = select_grid(width, height, allowed, side)
  target_w, target_h = cols * side, rows * side
  if target_w / width < target_h / height:
    new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
  else:
    new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
  canvas = Image.new('RGB', (target_w, target_h), (0, 0, 0))
  canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC),
               ((target_w - new_w) // 2, (target_h - new_h) // 2))
  pixels = np.asarray(canvas, np.uint8)
  crops = pixels.reshape(rows, side, cols, side, 3).transpose(0, 2, 1, 3, 4)
  return np.concatenate([base, crops.reshape(rows * cols, side, side, 3)])



def uniform_indices(total: int, num_frames: int) -> np.ndarray:
  """min(total, num_frames) frame indices spread evenly over [0, total - 1] (as LLaVA-OneVision:
  linspace, rounded down)."""
  return np.linspace(0, total - 1, min(total, num_frames)).astype(np.int64)
