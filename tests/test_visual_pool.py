"""Padding-free visual batches: records' crops and frames packed into a frame pool give each
row the logits it has alone and as padded per-kind inputs; the vision tower encodes exactly the
real crops and frames; rows that do not fit are trimmed and counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lavi_jax.data import visual_pool
from lavi_jax.data.errors import DataError
from lavi_jax.models import LaVi
from tests.helpers import random_params, tiny_config

LENGTH = 12


def _config(**overrides):
  """tiny at 64 px / patch 8 (video frames pooled 2 x 2), images of up to 5 crops, 4 frames."""
  config = tiny_config(**{'vision.image_size': 64, 'vision.patch_size': 8,
                          'vision.video_pool': 2, **overrides})
  config.data.update(max_crops=5, max_images=5, num_frames=4)
  return config


def _example(model, rng, items):
  """An example with one placeholder per item; items: (frames, is_video) each."""
  ids = rng.integers(3, model.llm.vocab_size, LENGTH).astype(np.int32)
  for k, (_, video) in enumerate(items):
    ids[1 + 3 * k] = model.video_token_id if video else model.image_token_id
  side = model.vision.image_size
  frames = [rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8) for n, _ in items]
  return dict(
      input_ids=ids, text_mask=np.arange(LENGTH) < LENGTH - 1,
      frames=np.concatenate(frames) if frames else np.zeros((0, side, side, 3), np.uint8),
      frame_item=np.array([k for k, (n, _) in enumerate(items) for _ in range(n)], np.int32),
      frame_video=np.array([v for n, v in items for _ in range(n)], bool))


# A one-crop image, an AnyRes image (base + 2 x 2 grid), a 4-frame video, and two images with a
# video between them.
RECORDS = ([(1, False)], [(5, False)], [(4, True)], [(1, False), (3, True), (1, False)])


def _pool(config, examples, frames_per_row):
  config.data.frames_per_row = frames_per_row
  spec = visual_pool.pool_spec(config, len(examples), 1)
  pool, trimmed = visual_pool.pack(examples, spec)
  np.testing.assert_array_equal(trimmed, 0)
  return pool


def _padded(model, example):
  """The same example as per-kind padded inputs (one row)."""
  out = {}
  for kind, video, count in (('images', False, 5), ('videos', True, 4)):
    chosen = example['frame_video'] == video
    n = int(chosen.sum())
    pixels = np.zeros((1, count) + example['frames'].shape[1:], np.uint8)
    pixels[0, :n] = example['frames'][chosen]
    item = np.zeros((1, count), np.int32)
    item[0, :n] = example['frame_item'][chosen]
    out[kind] = dict(pixel_values=pixels, frame_item=item, frame_mask=np.arange(count)[None] < n)
  return out


@pytest.mark.parametrize('overrides', [{}, {'viln.conditioner': 'conv'}, {'fusion': 'concat'}])
def test_mixed_pool_gives_each_row_its_own_logits(overrides):
  config = _config(**overrides)
  model = config.model
  rng = np.random.default_rng(0)
  examples = [_example(model, rng, items) for items in RECORDS]
  params = random_params(model)
  lavi = LaVi(model)
  apply = jax.jit(lambda p, **kw: lavi.apply({'params': p}, **kw))
  real = sum(len(e['frames']) for e in examples)
  pool = _pool(config, examples, real / len(examples))  # exactly the real crops and frames
  assert pool['pixels'].shape[:2] == (1, real) and pool['frame_valid'].all()
  ids = np.stack([e['input_ids'] for e in examples])
  mask = np.stack([e['text_mask'] for e in examples])
  together = apply(params, input_ids=ids, text_mask=mask, visual=pool)
  for row, example in enumerate(examples):
    alone_pool = _pool(config, [example], len(example['frames']))
    alone = apply(params, input_ids=ids[row:row + 1], text_mask=mask[row:row + 1],
                  visual=alone_pool)
    padded = apply(params, input_ids=ids[row:row + 1], text_mask=mask[row:row + 1],
                   **_padded(model, example))
    valid = mask[row]
    np.testing.assert_allclose(together[row][valid], alone[0][valid], atol=2e-5)
    np.testing.assert_allclose(together[row][valid], padded[0][valid], atol=2e-5)


def test_vision_tower_encodes_only_the_pool_slots():
  config = _config()
  model = config.model
  rng = np.random.default_rng(1)
  examples = [_example(model, rng, items) for items in RECORDS]
  real = sum(len(e['frames']) for e in examples)
  pool = _pool(config, examples, real / len(examples))
  ids = np.stack([e['input_ids'] for e in examples])
  _, state = LaVi(model).apply({'params': random_params(model)}, input_ids=ids, visual=pool,
                               capture_intermediates=lambda m, _: m.name == 'vit',
                               mutable=['intermediates'])
  (features,) = state['intermediates']['vit']['__call__']
  assert features.shape[0] == real == 15
  # Padded per kind, every row pays for the largest record of each kind.
  assert 4 * (5 + 4) == 36 > real


def test_rows_that_do_not_fit_are_trimmed_and_counted():
  config = _config()
  rng = np.random.default_rng(2)
  examples = [_example(config.model, rng, items) for items in RECORDS[1:3]]  # 5 crops, 4 frames
  config.data.frames_per_row = 2.5  # 5 slots for 9 frames
  spec = visual_pool.pool_spec(config, 2, 1)
  pool, trimmed = visual_pool.pack(examples, spec)
  # The AnyRes image keeps its base crop (one slot is kept for the video), the video all 4.
  np.testing.assert_array_equal(trimmed, [1, 0])
  np.testing.assert_array_equal(pool['pixels'][0, 0], examples[0]['frames'][0])
  np.testing.assert_array_equal(pool['pixels'][0, 1:], examples[1]['frames'])
  assert pool['token_mask'][0].sum() == spec.image_tokens
  assert pool['token_mask'][1].sum() == 4 * spec.video_tokens
  config.data.frames_per_row = 1.5  # 3 slots: the video keeps 2 frames, the first and last
  pool, trimmed = visual_pool.pack(examples, visual_pool.pool_spec(config, 2, 1))
  np.testing.assert_array_equal(trimmed, [1, 1])
  np.testing.assert_array_equal(pool['pixels'][0, 1:], examples[1]['frames'][[0, 3]])
  config.data.frames_per_row = 0.5  # 1 slot for 2 items
  with pytest.raises(DataError, match='data.frames_per_row'):
    visual_pool.pack(examples, visual_pool.pool_spec(config, 2, 1))


def test_uint8_pixels_are_normalised_as_siglip():
  config = _config()
  model = config.model
  rng = np.random.default_rng(3)
  pixels = rng.integers(0, 256, (1, 1, 64, 64, 3), dtype=np.uint8)
  ids = np.where(np.arange(LENGTH) == 1, model.image_token_id, 5)[None]
  params = random_params(model)
  lavi = LaVi(model)
  as_uint8 = lavi.apply({'params': params}, input_ids=ids, images=dict(pixel_values=pixels))
  siglip = (pixels / 255.0 - 0.5) / 0.5  # SigLIP's processor: mean 0.5, std 0.5
  as_float = lavi.apply({'params': params}, input_ids=ids,
                        images=dict(pixel_values=jnp.asarray(siglip, jnp.float32)))
  np.testing.assert_allclose(as_uint8, as_float, atol=1e-5)
