"""Local exports of the benchmark datasets: records from Parquet, JSONL or JSON files, with
images and videos embedded as bytes or given as paths relative to the data file's folder.

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

from lavi_jax.data import image as image_lib
from lavi_jax.data.errors import DataError

SUFFIXES = ('.parquet', '.jsonl', '.json')


def find_data_file(data_dir: str, stem: str) -> str:
  """`{data_dir}/{stem}` with the first suffix of SUFFIXES that exists."""
  for suffix in SUFFIXES:
    path = os.path.join(data_dir, stem + suffix)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f'no {stem}{{{",".join(SUFFIXES)}}} in {data_dir} (see the README, '
                          '"Evaluation", for how to export the dataset)')


def read_records(path: str, limit: int = 0) -> list[dict[str, Any]]:
  """The first `limit` records (0: all) of a Parquet, JSONL or JSON-list file."""
  if path.endswith('.parquet'):
    table = pq.read_table(path)
    return (table.slice(0, limit) if limit else table).to_pylist()
  records = []
  with open(path, encoding='utf-8') as f:
    if path.endswith('.json'):
      records = json.load(f)
      if not isinstance(records, list):
        raise DataError(f'{path}: a .json data file must hold a list of records')
    else:
      for number, line in enumerate(f, 1):
        if limit and len(records) == limit:
          break
        if line.strip():
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise DataError(f'{path}:{number}: not JSON: {e}') from e
  return records[:limit] if limit else records


def media(value: Any, root: str, where: str) -> bytes | str:
  """An image/video field -> encoded bytes or an absolute path (`where` names the field)."""
  if isinstance(value, dict) and ('bytes' in value or 'path' in value):
    value = value.get('bytes') or value.get('path')
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, str) and value:
    return value if os.path.isabs(value) else os.path.join(root, value)
  raise DataError(f'{where}: expected image/video bytes, an {{"bytes", "path"}} struct or a '
                  f'path, got {type(value).__name__}')


def frames_as_video(values: list, root: str, where: str) -> np.ndarray:
  """A list of frame images (a video given as frames) -> uint8 frames (F, H, W, 3)."""
  frames = [np.asarray(image_lib.decode_image(media(v, root, f'{where}[{i}]')))
            for i, v in enumerate(values)]
  if not frames or len({f.shape for f in frames}) != 1:
    raise DataError(f'{where}: video frames must be a non-empty list of same-sized images')
  return np.stack(frames)
