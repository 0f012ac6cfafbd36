"""The Grain input pipeline: sources -> shard by process -> shuffle -> mix -> preprocess ->
drop and count bad records -> batch -> worker processes.

Batches (per process: B = data.batch_size / process_count) are dicts of numpy arrays with
fixed shapes; T = data.max_text_len, S = model.vision.image_size, Fi = max(data.max_crops,
data.max_images), Fv = data.num_frames:
  input_ids (B, T) int32; text_mask (B, T) bool (right padding); targets (B, T) int32
  (targets[t] = input_ids[t + 1], 0 at the end); loss_mask (B, T) bool (targets[t] is an
  assistant answer token)
  images = {pixel_values (B, Fi, S, S, 3) float32 in [-1, 1], frame_mask (B, Fi) bool,
            frame_item (B, Fi) int32}; videos = the same with Fv frames (only when Fv > 0)
  question_type (B,) int32 (-1: none)
  num_skipped (B,) int32: bad records skipped before each row (data.skip_bad_records); the
    batch's sum is the number skipped since the previous batch
  num_truncated (B,) int32: 1 where trailing turns were dropped to fit T
Evaluation ('eval') reads data.eval_mixture once, in order; short batches (the last one of
each worker) are padded with empty rows (text_mask all False, question_type -1).

Determinism: batches depend only on the config (seed, mixture, sizes, num_workers) and the
process index/count. `iter(make_dataset(...))` is a grain.DatasetIterator: get_state() /
set_state() resume exactly; with Orbax save it as
`ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator))` (CheckpointRestore to load).
Packing several conversations into one row is not implemented.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from lavi_jax.config import ConfigError
from lavi_jax.data import chat, mixture, synthetic
from lavi_jax.data.sample import ExampleSpec, Preprocess, Skipped
from lavi_jax.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, Tokenizer, load_tokenizer

SPLITS = ('train', 'eval')
# Give up when this many records in a row are bad (skip_bad_records), e.g. a wrong image_root.
MAX_CONSECUTIVE_SKIPS = 1000


def make_tokenizer(data: ml_collections.ConfigDict) -> Tokenizer:
  """data.tokenizer: '' for the synthetic word-level tokenizer, else a tokenizer file/dir."""
  return load_tokenizer(data.tokenizer) if data.tokenizer else synthetic.synthetic_tokenizer()


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: Tokenizer):
  """The model's placeholder ids and vocabulary, and the chat template, fit the tokenizer."""
  model = config.model
  for key, token in (('image_token_id', IMAGE_TOKEN), ('video_token_id', VIDEO_TOKEN)):
    if model[key] != tokenizer.token_id(token):
      raise ConfigError(f'config.model.{key}={model[key]}, but the tokenizer '
                        f'({config.data.tokenizer or "synthetic"}) gives {token} the id '
                        f'{tokenizer.token_id(token)}')
  if tokenizer.vocab_size > model.llm.vocab_size:
    raise ConfigError(f'config.model.llm.vocab_size={model.llm.vocab_size} is smaller than the '
                      f"tokenizer's {tokenizer.vocab_size} ids")
  template = chat.get_template(config.data.chat_template)
  for marker in template.markers:
    if tokenizer.find_id(marker) is None:
      raise ConfigError(f'config.data.chat_template={template.name!r} needs {marker!r} as one '
                        'token, but the tokenizer has no such token')


def example_spec(config: ml_collections.ConfigDict) -> ExampleSpec:
  data = config.data
  return ExampleSpec(max_text_len=data.max_text_len, image_size=config.model.vision.image_size,
                     max_crops=data.max_crops, max_images=data.max_images,
                     grids=tuple(tuple(g) for g in data.anyres_grids),
                     num_frames=data.num_frames)


def local_batch_size(config: ml_collections.ConfigDict, process_count: int) -> int:
  if config.data.batch_size % process_count:
    raise ConfigError(f'config.data.batch_size={config.data.batch_size} is not divisible by '
                      f'the {process_count} processes')
  return config.data.batch_size // process_count


def batch_spec(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """jax.ShapeDtypeStruct of every batch entry, for `batch_size` rows."""
  spec = example_spec(config)
  b, t, s = batch_size, spec.max_text_len, spec.image_size

  def visual(frames):
    return dict(pixel_values=jax.ShapeDtypeStruct((b, frames, s, s, 3), np.float32),
                frame_mask=jax.ShapeDtypeStruct((b, frames), np.bool_),
                frame_item=jax.ShapeDtypeStruct((b, frames), np.int32))

  out = dict(input_ids=jax.ShapeDtypeStruct((b, t), np.int32),
             text_mask=jax.ShapeDtypeStruct((b, t), np.bool_),
             targets=jax.ShapeDtypeStruct((b, t), np.int32),
             loss_mask=jax.ShapeDtypeStruct((b, t), np.bool_),
             images=visual(spec.image_frames),
             question_type=jax.ShapeDtypeStruct((b,), np.int32),
             num_skipped=jax.ShapeDtypeStruct((b,), np.int32),
             num_truncated=jax.ShapeDtypeStruct((b,), np.int32))
  if spec.num_frames:
    out['videos'] = visual(spec.num_frames)
  return out


class CountSkipped(grain.IterDataset):
  """Drops `Skipped` records and sets each example's `num_skipped` to how many were dropped
  since the previous example (so the count survives batching and worker processes)."""

  def __iter__(self) -> grain.DatasetIterator:
    return _CountSkippedIterator(self._parent.__iter__())


class _CountSkippedIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._pending = 0

  def __next__(self):
    while True:
      element = next(self._parent)
      if not isinstance(element, Skipped):
        element['num_skipped'] = np.int32(self._pending)
        self._pending = 0
        return element
      self._pending += 1
      if self._pending >= MAX_CONSECUTIVE_SKIPS:
        raise RuntimeError(f'{self._pending} bad records in a row; the last: {element.reason}')

  def get_state(self):
    return dict(parent=self._parent.get_state(), pending=self._pending)

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._pending = state['pending']


class PadBatch(grain.transforms.Map):
  """Pads a short (last) batch to `batch_size` rows of nothing (question_type -1)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def map(self, batch):
    missing = self.batch_size - len(batch['input_ids'])
    if not missing:
      return batch
    def pad(x):
      return np.concatenate([x, np.zeros((missing,) + x.shape[1:], x.dtype)])

    batch = jax.tree.map(pad, batch)
    batch['question_type'][-missing:] = -1
    return batch


def make_dataset(config: ml_collections.ConfigDict, split: str = 'train', *,
                 process_index: int = 0, process_count: int = 1,
                 tokenizer: Tokenizer | None = None) -> grain.IterDataset:
  """This process's batches of `split` ('train': data.train_mixture, shuffled, endless;
  'eval': data.eval_mixture, one ordered pass). Iterate with `iter(...)` (checkpointable)."""
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  data, train = config.data, split == 'train'
  tokenizer = tokenizer or make_tokenizer(data)
  check_tokenizer(config, tokenizer)
  batch_size = local_batch_size(config, process_count)
  entries = mixture.parse_mixture(data.train_mixture if train else data.eval_mixture)
  ds = mixture.shard_and_mix([mixture.make_source(e, data) for e in entries],
                             [e.weight for e in entries], seed=data.seed, train=train,
                             process_index=process_index, process_count=process_count)
  ds = ds.map(Preprocess(example_spec(config), tokenizer, chat.get_template(data.chat_template),
                         data.skip_bad_records))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                            prefetch_buffer_size=2 * batch_size))
  ds = CountSkipped(ds).batch(batch_size, drop_remainder=train)
  if not train:
    ds = ds.map(PadBatch(batch_size))
  if data.num_workers:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return ds
