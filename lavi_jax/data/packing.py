"""Packing several examples (conversations) into one row of max_text_len tokens.

A packed row has the example fields of lavi_jax.data.sample, plus
  segment_ids (T,) int32: 0 on padding, 1, 2, ... per conversation in the row,
  positions (T,) int32: RoPE positions, restarting at 0 for each conversation (0 on padding).
Each conversation keeps its own text arrays (input_ids, text_mask, targets, loss_mask are the
conversations' valid prefixes laid end to end), so targets and the loss mask never cross a
conversation boundary. Visual frames are concatenated in row order; frame_item stays one
numbering per row (items in placeholder order), each conversation's items shifted by the items
of the conversations before it, and frame_segment (n,) int32 gives each frame its
conversation. num_truncated is summed; question_type is the first conversation's.

Greedy first-fit: an example goes to the first open row with room for its text (and, when
limits are given, its frames and visual tokens at full size); otherwise a new row opens, and
beyond `open_rows` open rows the oldest is emitted. An example is never cut or dropped: one
that does not fit an empty row on its own is a DataError naming it.

Why not grain's experimental FirstFitPackIterDataset: it packs 1-D sequences along one shared
length, while an example also carries a variable number of frames (n, S, S, 3) whose item
numbers must be shifted per row, and the row's visual budget (frames and visual tokens) is a
second, independent capacity; this small iterator handles both.

The model reads packed rows through `segment_ids` (LaVi.__call__ / LaVi.hidden; it derives
positions and each visual item's conversation itself). Not wired into batching yet (no
data.packing switch): the iterator here has no checkpoint state, which grain's data iterator
needs before it can replace `.batch` in pipeline.make_dataset.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import numpy as np

from lavi_jax.data.errors import DataError

TEXT_KEYS = ('input_ids', 'text_mask', 'targets', 'loss_mask')


def _length(example: dict[str, Any]) -> int:
  return int(np.asarray(example['text_mask']).sum())


def _items(example: dict[str, Any]) -> int:
  items = np.asarray(example['frame_item'])
  return int(items.max()) + 1 if items.size else 0


def _name(example: dict[str, Any], index: int) -> str:
  return f"example {index} (id {example.get('id', '?')!r})"


class _Row:

  def __init__(self):
    self.examples: list[dict[str, Any]] = []
    self.length = self.frames = self.tokens = 0


def pack_rows(examples: Iterable[dict[str, Any]], max_text_len: int, *,
              max_frames: int | None = None, max_tokens: int | None = None,
              tokens_of: Callable[[bool], int] | None = None,
              open_rows: int = 8) -> Iterator[dict[str, Any]]:
  """Examples -> packed rows (see the module docstring). max_frames / max_tokens: a row's
  frame and visual token budget (None: unlimited); tokens_of(is_video): tokens of one frame,
  needed with max_tokens."""
  if max_tokens is not None and tokens_of is None:
    raise ValueError('max_tokens needs tokens_of')
  rows: list[_Row] = []
  for index, example in enumerate(examples):
    length, video = _length(example), np.asarray(example['frame_video'])
    frames = len(video)
    tokens = sum(tokens_of(bool(v)) for v in video) if tokens_of else 0
    if length > max_text_len:
      raise DataError(f'{_name(example, index)} has {length} text tokens, more than '
                      f'data.max_text_len = {max_text_len}')
    if max_frames is not None and frames > max_frames:
      raise DataError(f'{_name(example, index)} has {frames} frames, more than a row holds '
                      f'({max_frames}); raise data.frames_per_row')
    if max_tokens is not None and tokens > max_tokens:
      raise DataError(f'{_name(example, index)} needs {tokens} visual tokens, more than a row '
                      f'holds ({max_tokens}); raise data.tokens_per_row')

    def fits(row: _Row) -> bool:
      return (row.length + length <= max_text_len and
              (max_frames is None or row.frames + frames <= max_frames) and
              (max_tokens is None or row.tokens + tokens <= max_tokens))

    row = next((r for r in rows if fits(r)), None)
    if row is None:
      if len(rows) >= open_rows:
        yield merge(rows.pop(0).examples, max_text_len)
      row = _Row()
      rows.append(row)
    row.examples.append(example)
    row.length += length
    row.frames += frames
    row.tokens += tokens
  for row in rows:
    yield merge(row.examples, max_text_len)


def merge(examples: list[dict[str, Any]], max_text_len: int) -> dict[str, Any]:
  """Lays examples end to end in one row of max_text_len tokens."""
  t = max_text_len
  out = {k: np.zeros(t, np.asarray(examples[0][k]).dtype) for k in TEXT_KEYS}
  out['segment_ids'] = np.zeros(t, np.int32)
  out['positions'] = np.zeros(t, np.int32)
  frames, frame_item, frame_video, frame_segment = [], [], [], []
  start = items = 0
  for segment, example in enumerate(examples, start=1):
    n = _length(example)
    if start + n > t:
      raise DataError(f'examples of {start + n} text tokens do not fit {t}')
    for k in TEXT_KEYS:
      out[k][start:start + n] = np.asarray(example[k])[:n]
    out['segment_ids'][start:start + n] = segment
    out['positions'][start:start + n] = np.arange(n)
    frames.append(np.asarray(example['frames']))
    frame_item.append(np.asarray(example['frame_item'], np.int32) + items)
    frame_video.append(np.asarray(example['frame_video'], bool))
    frame_segment.append(np.full(len(example['frame_item']), segment, np.int32))
    items += _items(example)
    start += n
  out['frames'] = np.concatenate(frames)
  out['frame_item'] = np.concatenate(frame_item)
  out['frame_video'] = np.concatenate(frame_video)
  out['frame_segment'] = np.concatenate(frame_segment)
  out['question_type'] = np.int32(examples[0].get('question_type', -1))
  out['num_truncated'] = np.int32(sum(int(e.get('num_truncated', 0)) for e in examples))
  return out
