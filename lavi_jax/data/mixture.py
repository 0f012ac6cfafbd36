"""Mixtures of sources: the spec string, and deterministic Grain sharding, shuffling and mixing.

A spec is a comma-separated list of `KIND:ARG[@WEIGHT]` (weight 1 when left out):
  synthetic:SPLIT[:SIZE]   built-in shapes (synthetic.py), SIZE records (default 10000)
  llava:PATH               LLaVA JSON / JSONL annotations (llava.py), paths under
                           data.image_root / data.video_root
  tfds:NAME_OR_DIR#SPLIT   TFDS ArrayRecord dataset (tfds_data.py), names under data.tfds_data_dir
e.g. 'llava:/data/llava_v1_5_mix665k.json@0.8,tfds:/data/ocr/default/1.0.0#train@0.2'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from lavi_jax.data import llava, synthetic, tfds_data


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str
  arg: str
  weight: float


def parse_mixture(spec: str) -> list[SourceSpec]:
  """'KIND:ARG[@WEIGHT],...' -> [SourceSpec]; ValueError naming the bad entry."""
  entries = []
  for entry in filter(None, (e.strip() for e in spec.split(','))):
    body, weight = entry, 1.0
    head, at, tail = entry.rpartition('@')
    if at:
      try:
        body, weight = head, float(tail)
      except ValueError:
        pass  # an '@' inside a path
    kind, _, arg = body.partition(':')
    if kind not in ('synthetic', 'llava', 'tfds') or not arg:
      raise ValueError(f'bad mixture entry {entry!r}: expected synthetic:SPLIT[:SIZE], '
                       'llava:PATH or tfds:NAME_OR_DIR#SPLIT, optionally followed by @WEIGHT')
    if kind == 'tfds' and '#' not in arg:
      raise ValueError(f'bad mixture entry {entry!r}: tfds entries name a split: '
                       'tfds:NAME_OR_DIR#SPLIT')
    if not weight > 0:
      raise ValueError(f'bad mixture entry {entry!r}: the weight must be positive')
    entries.append(SourceSpec(kind, arg, weight))
  if not entries:
    raise ValueError(f'empty mixture {spec!r}')
  return entries


def synthetic_question_types(s: ml_collections.ConfigDict) -> tuple[str, ...]:
  """data.synthetic.question_types ('a,b'; '' = all) as a tuple."""
  names = s.get('question_types', '')
  return tuple(n.strip() for n in names.split(',')) if names else synthetic.QUESTION_TYPES


def make_source(entry: SourceSpec, data: ml_collections.ConfigDict):
  """A random-access source of raw records for one mixture entry."""
  if entry.kind == 'synthetic':
    split, _, size = entry.arg.partition(':')
    s = data.synthetic
    return synthetic.SyntheticShapes(split, int(size or 10_000), s.seed, s.image_size,
                                     s.video_frames, s.video_fraction,
                                     synthetic_question_types(s))
  if entry.kind == 'llava':
    return llava.LlavaSource(entry.arg, data.image_root, data.video_root, data.skip_bad_records)
  name, _, split = entry.arg.rpartition('#')
  return tfds_data.TfdsSource(name, split, data.tfds_data_dir)


def shard_and_mix(sources: Sequence[Any], weights: Sequence[float], *, seed: int, train: bool,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Each process takes records process_index::process_count of every source. For training,
  each shard is shuffled (anew each epoch), repeated forever and mixed by `weights` (grain's
  deterministic proportional interleaving); otherwise the shards are read once, in order, one
  source after the other."""
  shards = []
  for k, source in enumerate(sources):
    shard = grain.MapDataset.source(source)[process_index::process_count]
    if not len(shard):
      raise ValueError(f'{source!r} has no records for process {process_index} of '
                       f'{process_count}')
    if train:
      shuffle_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
      shard = shard.shuffle(seed=shuffle_seed).repeat()
    shards.append(shard)
  if len(shards) == 1:
    return shards[0]
  if train:
    return grain.MapDataset.mix(shards, [float(w) for w in weights])
  return grain.MapDataset.concatenate(shards)
