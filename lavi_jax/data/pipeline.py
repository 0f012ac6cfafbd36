"""The Grain input pipeline: sources -> shard by process -> shuffle -> mix -> preprocess ->
drop and count bad records -> batch -> worker processes.

Batches (per process: B = the global batch / process_count) are dicts of numpy arrays with
fixed shapes; T = data.max_text_len:
  input_ids (B, T) int32; text_mask (B, T) bool (right padding); targets (B, T) int32
  (targets[t] = input_ids[t + 1], 0 at the end); loss_mask (B, T) bool (targets[t] is an
  assistant answer token)
  visual: the frame pool of the batch's crops and frames, uint8 pixels with no padding crops
    (G groups of M slots; lavi_jax.models.visual, lavi_jax.data.visual_pool)
  num_visual_trimmed (B,) int32: visual items that kept fewer crops/frames to fit the pool
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

from lavi_jax import config as lavi_config
from lavi_jax.config import ConfigError
from lavi_jax.data import chat, mixture, synthetic, visual_pool
from lavi_jax.data.sample import ExampleSpec, Preprocess, Skipped
from lavi_jax.data.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN, Tokenizer, load_tokenizer

SPLITS = ('train', 'eval')
# Give up when this many records in a row are bad (skip_bad_records), e.g. a wrong image_root.
MAX_CONSECUTIVE_SKIPS = 1000
# Example fields of a record's crops and frames, packed into the batch's frame pool.
FRAME_FIELDS = ('frames', 'frame_item', 'frame_video')


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
  """This process's rows of each global batch: data.batch_size / processes, or with
  data.per_device_batch_size set, the global batch it makes on the devices at hand."""
  per_device = config.data.per_device_batch_size
  batch = lavi_config.global_batch_size(config) if per_device else config.data.batch_size
  if batch % process_count:
    raise ConfigError(f'config.data.batch_size={batch} is not divisible by the {process_count} '
                      'processes (with data.per_device_batch_size set: the global batch it '
                      'makes)')
  return batch // process_count


def visual_groups(config: ml_collections.ConfigDict, batch_shards: int = 1) -> int:
  """Frame-pool groups of a batch spread over `batch_shards` (data x fsdp devices of this
  process's rows): one per shard and accumulation micro-batch (lavi_jax.data.visual_pool)."""
  return batch_shards * config.train.accumulation_steps


def batch_spec(config: ml_collections.ConfigDict, batch_size: int,
               groups: int | None = None) -> dict[str, Any]:
  """jax.ShapeDtypeStruct of every batch entry, for `batch_size` rows in `groups` frame-pool
  groups (default: `visual_groups(config)`)."""
  spec = example_spec(config)
  b, t = batch_size, spec.max_text_len
  pool = visual_pool.pool_spec(config, b, groups or visual_groups(config))
  rows = lambda dtype: jax.ShapeDtypeStruct((b,), dtype)
  return dict(input_ids=jax.ShapeDtypeStruct((b, t), np.int32),
              text_mask=jax.ShapeDtypeStruct((b, t), np.bool_),
              targets=jax.ShapeDtypeStruct((b, t), np.int32),
              loss_mask=jax.ShapeDtypeStruct((b, t), np.bool_),
              visual=visual_pool.abstract_pool(pool),
              question_type=rows(np.int32), num_skipped=rows(np.int32),
              num_truncated=rows(np.int32), num_visual_trimmed=rows(np.int32))


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


class PackBatch:
  """Grain batch_fn: examples -> a batch of `spec.rows` rows whose crops and frames are packed
  into the frame pool (`visual_pool.pack`); a short (last eval) batch gets rows of nothing
  (question_type -1)."""

  def __init__(self, spec: visual_pool.PoolSpec):
    self.spec = spec

  def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
    examples = list(examples)
    empty = {k: (np.zeros_like(v) if k not in FRAME_FIELDS else v[:0])
             for k, v in examples[0].items()}
    empty['question_type'] = np.int32(-1)
    examples += [empty] * (self.spec.rows - len(examples))
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]
             if k not in FRAME_FIELDS}
    batch['visual'], batch['num_visual_trimmed'] = visual_pool.pack(examples, self.spec)
    return batch


def make_dataset(config: ml_collections.ConfigDict, split: str = 'train', *,
                 process_index: int = 0, process_count: int = 1,
                 tokenizer: Tokenizer | None = None,
                 groups: int | None = None) -> grain.IterDataset:
  """This process's batches of `split` ('train': data.train_mixture, shuffled, endless;
  'eval': data.eval_mixture, one ordered pass), in `groups` frame-pool groups (default:
  `visual_groups(config)`). Iterate with `iter(...)` (checkpointable)."""
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
  pool = visual_pool.pool_spec(config, batch_size, groups or visual_groups(config))
  ds = CountSkipped(ds).batch(batch_size, drop_remainder=train, batch_fn=PackBatch(pool))
  if data.num_workers:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.num_workers))
  return ds
