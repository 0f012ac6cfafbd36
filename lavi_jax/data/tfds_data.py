"""TFDS ArrayRecord data: a source over `tfds.data_source`, and a builder that writes the built-in
synthetic set as ArrayRecord. Neither needs TensorFlow.

Datasets read by `TfdsSource` have the builder's features:
  id             Text
  conversations  Text: the LLaVA turns as JSON
  images         Sequence(Image): one image per <image>
  video          Tensor (F, H, W, 3) uint8: the frames of the <video>; F = 0 when there is none
  question_type  int32, index into synthetic.QUESTION_TYPES (-1: none)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from lavi_jax.data import synthetic


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'id': tfds.features.Text(),
      'conversations': tfds.features.Text(),
      'images': tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
      'video': tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
      'question_type': tfds.features.Scalar(np.int32),
  })


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes and parameters of the synthetic set (see synthetic.SyntheticShapes)."""
  train_size: int = 10_000
  test_size: int = 1_000
  seed: int = 0
  image_size: int = 64
  video_frames: int = 8
  video_fraction: float = 0.2


class SyntheticShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """Writes synthetic.SyntheticShapes ('train', 'test'), e.g.
  `SyntheticShapesBuilder(data_dir=d, file_format='array_record').download_and_prepare()`;
  pass `config=ShapesConfig(name=..., ...)` for other sizes."""
  name = 'synthetic_shapes'
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [ShapesConfig(name='default')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=synthetic.__doc__,
                                 features=features())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    sizes = {'train': self.builder_config.train_size, 'test': self.builder_config.test_size}
    return {split: self._generate_examples(split, size) for split, size in sizes.items()}

  def _generate_examples(self, split: str, size: int):
    c = self.builder_config
    source = synthetic.SyntheticShapes(split, size, c.seed, c.image_size, c.video_frames,
                                       c.video_fraction)
    empty = np.zeros((0, c.image_size, c.image_size, 3), np.uint8)
    for index in range(size):
      record = source[index]
      yield index, dict(id=record['id'], conversations=json.dumps(record['conversations']),
                        images=[Image.fromarray(x) for x in record['images']],
                        video=record['videos'][0] if record['videos'] else empty,
                        question_type=record['question_type'])


class TfdsSource:
  """Random-access source of raw records (see `sample.py`) over a TFDS ArrayRecord dataset:
  `name_or_dir` is a registered dataset name (found in `data_dir`) or a prepared dataset's
  directory (`.../name/config/version`). Nothing is downloaded."""

  def __init__(self, name_or_dir: str, split: str, data_dir: str = ''):
    self.name, self.split = name_or_dir, split
    if epath.Path(name_or_dir).is_dir():
      self._source = tfds.builder_from_directory(name_or_dir).as_data_source(split)
    else:
      self._source = tfds.data_source(name_or_dir, split=split, data_dir=data_dir or None,
                                      download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f'TfdsSource({self.name!r}, split={self.split!r})'

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    video = example['video']
    return dict(id=example['id'].decode(), origin=f'{self.name}[{self.split}] record {index}',
                conversations=json.loads(example['conversations']),
                images=list(example['images']), videos=[video] if len(video) else [],
                question_type=int(example['question_type']))
