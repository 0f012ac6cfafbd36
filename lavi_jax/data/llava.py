"""LLaVA-format annotations (JSON list or JSONL) as a random-access source of raw records.

The format of LLaVA-558K/665K and LLaVA-OneVision data: each record has an `id`, optional
`image` (one path or a list) and `video` (one path or a list), and `conversations` (LLaVA turns
with `<image>` / `<video>` placeholders in the text). Relative paths are resolved against
`image_root` / `video_root` ('' = the annotation file's folder); files are read later, by
`sample.Preprocess`, so that a missing or corrupt file fails (or is skipped) per record.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from lavi_jax.data.errors import DataError


class LlavaSource:
  """Random-access source (grain.RandomAccessDataSource) of raw records (see `sample.py`).

  Records are kept as one block of JSON text (cheap to pickle into worker processes). A
  malformed JSONL line raises DataError naming the file and line; with `skip_bad_records` it is
  skipped, counted in `num_skipped` and logged (a warning with the count and the first line).
  A malformed JSON file always raises.
  """

  def __init__(self, path: str | os.PathLike, image_root: str = '', video_root: str = '',
               skip_bad_records: bool = False):
    self.path = epath.Path(path)
    self.image_root = image_root or str(self.path.parent)
    self.video_root = video_root or str(self.path.parent)
    if not self.path.is_file():
      raise DataError(f'annotation file {self.path} does not exist')
    self.num_skipped = 0
    if self.path.suffix == '.jsonl':
      texts, self._where = self._read_jsonl(skip_bad_records)
    else:
      texts = [json.dumps(r).encode() for r in self._read_json()]
      self._where = [f'{self.path} record {i}' for i in range(len(texts))]
    self._blob = b''.join(texts)
    self._offsets = np.cumsum([0] + [len(t) for t in texts])

  def _read_json(self) -> list[Any]:
    try:
      records = json.loads(self.path.read_bytes())
    except json.JSONDecodeError as e:
      raise DataError(f'{self.path}: malformed JSON at line {e.lineno} column {e.colno}: '
                      f'{e.msg}') from e
    except UnicodeDecodeError as e:
      raise DataError(f'{self.path}: not UTF-8 text: {e}') from e
    if not isinstance(records, list):
      raise DataError(f'{self.path}: expected a JSON list of records, got {type(records).__name__}')
    return records

  def _read_jsonl(self, skip_bad_records: bool) -> tuple[list[bytes], list[str]]:
    texts, where, first_skipped = [], [], ''
    with self.path.open('rb') as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          if not isinstance(record, dict):
            raise ValueError(f'expected a JSON object, got {type(record).__name__}')
        except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
          message = f'{self.path} line {number}: malformed JSONL record: {e}'
          if not skip_bad_records:
            raise DataError(message) from e
          first_skipped = first_skipped or message
          self.num_skipped += 1
          continue
        texts.append(line.strip())
        where.append(f'{self.path} line {number}')
    if self.num_skipped:
      logging.warning('skipped %d malformed lines of %s; the first: %s', self.num_skipped,
                      self.path, first_skipped)
    return texts, where

  def __len__(self) -> int:
    return len(self._where)

  def __repr__(self) -> str:
    return f'LlavaSource({str(self.path)!r}, {len(self)} records)'

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = json.loads(self._blob[self._offsets[index]:self._offsets[index + 1]])
    if not isinstance(record, dict):
      record = {}  # a JSON list element that is not an object: Preprocess names what is missing
    return dict(
        id=str(record.get('id', index)),
        origin=self._where[index],
        conversations=record.get('conversations'),
        images=self._paths(record.get('image'), self.image_root),
        videos=self._paths(record.get('video'), self.video_root),
        question_type=-1)

  @staticmethod
  def _paths(value, root: str) -> list[str]:
    if value is None:
      return []
    values = value if isinstance(value, list) else [value]
    return [str(epath.Path(root) / v) if isinstance(v, str) else v for v in values]
