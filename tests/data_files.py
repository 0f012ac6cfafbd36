"""Test data files: scikit-image's sample photographs saved in several formats, a PyAV video,
LLaVA annotation files, a small SentencePiece model, and the tiny config for fast data tests."""

import json

import av
import numpy as np
import sentencepiece
from PIL import Image

from tests.helpers import tiny_config

SENTENCES = ['the quick brown fox jumps over the lazy dog', 'what colour is the circle',
             'a chat between a curious user and an artificial intelligence assistant',
             'how many shapes are there in the picture', 'the red square is left of the blue one']


def train_sentencepiece(path):
  """A 60-piece BPE SentencePiece model of SENTENCES, written to `path` (.model)."""
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(SENTENCES * 20), model_prefix=str(path.with_suffix('')),
      vocab_size=60, model_type='bpe', hard_vocab_limit=False, minloglevel=2)
  return path


def write_photos(folder):
  """Real photos as PNG/JPEG in several modes -> {name: path}."""
  from skimage import data
  folder.mkdir(parents=True, exist_ok=True)
  astronaut = Image.fromarray(data.astronaut())  # 512 x 512 RGB
  paths = {
      'astronaut.png': astronaut,
      'coffee.jpg': Image.fromarray(data.coffee()),  # 600 x 400 RGB
      'camera.png': Image.fromarray(data.camera()),  # grey
      'palette.png': astronaut.convert('P', palette=Image.Palette.ADAPTIVE),
      'rgba.png': Image.fromarray(np.dstack([data.astronaut(),
                                             np.full((512, 512), 128, np.uint8)])),
      'grey16.png': Image.fromarray((data.camera().astype(np.uint16) * 257)),
  }
  out = {}
  for name, image in paths.items():
    image.save(folder / name)
    out[name] = folder / name
  return out


def write_video(path, num_frames=20, side=32, faststart=True):
  """An MP4 whose frame i is uniformly grey at level 12 * i."""
  options = {'movflags': 'faststart'} if faststart else {}
  with av.open(str(path), 'w', options=options) as out:
    stream = out.add_stream('mpeg4', rate=10)
    stream.width = stream.height = side
    stream.pix_fmt = 'yuv420p'
    stream.options = {'qscale': '1'}
    for i in range(num_frames):
      frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), 12 * i, np.uint8), 'rgb24')
      for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return path


def conversation(*turns):
  """('q1', 'a1', 'q2', ...) -> LLaVA turns."""
  return [{'from': 'gpt' if i % 2 else 'human', 'value': v} for i, v in enumerate(turns)]


def write_annotations(path, records):
  """records -> a LLaVA JSON list (.json) or JSONL (.jsonl) file."""
  if path.suffix == '.jsonl':
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  else:
    path.write_text(json.dumps(records, indent=1))
  return path


def data_config(**data):
  """configs/tiny.py with a small in-process data section (frame pools that fit every row, so
  rows do not depend on their batch); `data` overrides keys."""
  config = tiny_config()
  config.data.update(batch_size=4, num_workers=0, read_threads=0, frames_per_row=0,
                     train_mixture='synthetic:train:64', eval_mixture='synthetic:test:24')
  config.data.update(**data)
  return config


def row_frames(batch, row, config):
  """The crops/frames (n, S, S, 3) one row of a frame-pool batch reads, in its token order."""
  from lavi_jax.data import visual_pool  # pylint: disable=import-outside-toplevel
  pool = batch['visual']
  spec = visual_pool.pool_spec(config, len(batch['input_ids']), pool['pixels'].shape[0])
  group = row // (spec.rows // spec.groups)
  slots = pool['token_source'][row][pool['token_mask'][row]] // spec.tokens_per_slot
  return pool['pixels'][group, list(dict.fromkeys(slots.tolist()))]
