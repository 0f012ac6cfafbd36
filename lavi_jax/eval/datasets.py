"""Exports of the benchmark datasets, local or at a URL (gs://...): records from Parquet, JSONL
or JSON files, with images and videos embedded as bytes or given as paths relative to the data
file's folder.

A task's data is `{data_dir}/{stem}.parquet` (or `.jsonl`, `.json`), its records with the field
names of the lmms-eval (Hugging Face) datasets. An image field holds encoded bytes, a Hugging
Face `Image` struct ({'bytes', 'path'}, as `datasets` writes it to Parquet) or a path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from etils import epath

from lavi_jax.data import image as image_lib
from lavi_jax.data.errors import DataError
from lavi_jax.paths import is_url

SUFFIXES = ('.parquet', '.jsonl', '.json')


def find_data_file(data_dir: str | epath.PathLike, stem: str) -> epath.Path:
  """`{data_dir}/{stem}` with the first suffix of SUFFIXES that exists (local or a URL)."""
  for suffix in SUFFIXES:
    path = epath.Path(data_dir) / (stem + suffix)
    if path.exists():
      return path
  raise FileNotFoundError(f'no {stem}{{{",".join(SUFFIXES)}}} in {data_dir} (see the README, '
                          '"Evaluation", for how to export the dataset)')


def read_records(path: epath.Path, limit: int = 0) -> tuple[list[dict[str, Any]], int]:
  """The first `limit` records (0: all) of a Parquet, JSONL or JSON-list file, and the number
  of records in the whole file."""
  if path.suffix == '.parquet':
    with path.open('rb') as f:
      table = pq.read_table(f)
    return (table.slice(0, limit) if limit else table).to_pylist(), table.num_rows
  records, total = [], 0
  with path.open('r', encoding='utf-8') as f:
    if path.suffix == '.json':
      records = json.load(f)
      if not isinstance(records, list):
        raise DataError(f'{path}: a .json data file must hold a list of records')
      total = len(records)
    else:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        total += 1
        if limit and len(records) == limit:
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f'{path}:{number}: not JSON: {e}') from e
  return (records[:limit] if limit else records), total


def media(value: Any, root: epath.Path, where: str) -> bytes | str:
  """An image/video field -> encoded bytes or an absolute path (`where` names the field)."""
  if isinstance(value, dict) and ('bytes' in value or 'path' in value):
    value = value.get('bytes') or value.get('path')
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str) and value:
    return value if os.path.isabs(value) or is_url(value) else str(epath.Path(root) / value)
  raise DataError(f'{where}: expected image/video bytes, an {{"bytes", "path"}} struct or a '
                  f'path, got {type(value).__name__}')


def frames_as_video(values: list, root: epath.Path, where: str) -> np.ndarray:
  """A list of frame images (a video given as frames) -> uint8 frames (F, H, W, 3)."""
  frames = [np.asarray(image_lib.decode_image(media(v, root, f'{where}[{i}]')))
            for i, v in enumerate(values)]
  if not frames or len({f.shape for f in frames}) != 1:
    raise DataError(f'{where}: video frames must be a non-empty list of same-sized images')
  return np.stack(frames)
