"""The Grain pipeline: batch format, determinism, resuming from a state (in-process and with
worker processes, and through Orbax), process sharding, skipped and truncated records."""

import json

import jax
import numpy as np
import pytest

from lavi_jax.data import pipeline, synthetic
from lavi_jax.data.errors import DataError
from tests.data_files import (conversation, data_config, row_frames, write_annotations,
                              write_photos)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_batch_format():
  config = data_config()
  batch = next(iter(pipeline.make_dataset(config)))
  spec = pipeline.batch_spec(config, 4)
  assert jax.tree.structure(batch) == jax.tree.structure(spec)
  for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(spec)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  side, data = config.model.vision.image_size, config.data
  # One group of 4 rows; by default a row's share of slots fits the largest record (2 frames).
  assert spec['visual']['pixels'].shape == (1, 4 * data.num_frames, side, side, 3)
  ids, mask = batch['input_ids'], batch['text_mask']
  lengths = mask.sum(1)
  assert (mask == (np.arange(data.max_text_len) < lengths[:, None])).all()  # right padding
  np.testing.assert_array_equal(batch['targets'][:, :-1] * mask[:, 1:], ids[:, 1:] * mask[:, 1:])
  assert not (batch['targets'] * ~mask).any() and not (batch['loss_mask'] & ~mask).any()
  tok = synthetic.synthetic_tokenizer()
  for row in range(4):
    answer = tok.decode(batch['targets'][row][batch['loss_mask'][row]])
    assert answer.endswith('<|im_end|>') and len(answer.split('<|im_end|>')[0].split()) == 1
  pool = batch['visual']
  assert pool['pixels'].dtype == np.uint8
  frames = [len(row_frames(batch, r, config)) for r in range(4)]
  np.testing.assert_array_equal(pool['frame_valid'].sum(), sum(frames))  # no padding crops
  assert not pool['pixels'][~pool['frame_valid']].any()
  motion = batch['question_type'] == 4  # the synthetic videos; images have one crop
  np.testing.assert_array_equal(frames, np.where(motion, data.num_frames, 1))
  np.testing.assert_array_equal(pool['frame_video'].sum(), motion.sum() * data.num_frames)
  np.testing.assert_array_equal(batch['num_skipped'], 0)
  np.testing.assert_array_equal(batch['num_visual_trimmed'], 0)


def test_same_seed_same_batches_and_exact_resume():
  config = data_config()
  iterator = iter(pipeline.make_dataset(config))
  first = take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))  # what grain's checkpoint writes
  rest = take(iterator, 3)
  assert_same(first + rest, take(iter(pipeline.make_dataset(config)), 5))
  resumed = iter(pipeline.make_dataset(config))
  resumed.set_state(state)
  assert_same(rest, take(resumed, 3))
  config.data.seed = 1
  other = next(iter(pipeline.make_dataset(config)))
  assert not np.array_equal(other['input_ids'], first[0]['input_ids'])


def test_resume_through_grain_orbax_checkpoint(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  import grain
  config = data_config()
  iterator = iter(pipeline.make_dataset(config))
  take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 2)
    restored = iter(pipeline.make_dataset(config))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same(expected, take(restored, 2))


def test_worker_processes_are_deterministic_and_resume():
  config = data_config(num_workers=2)
  iterator = iter(pipeline.make_dataset(config))
  first = take(iterator, 3)
  state = iterator.get_state()
  rest = take(iterator, 2)
  iterator.close()
  resumed = iter(pipeline.make_dataset(config))
  resumed.set_state(state)
  assert_same(rest, take(resumed, 2))
  resumed.close()
  again = iter(pipeline.make_dataset(config))
  assert_same(first, take(again, 3))
  again.close()


def fingerprints(batches, config):
  """One hash per real row (images and text)."""
  return [hash(b['input_ids'][r].tobytes() + row_frames(b, r, config).tobytes())
          for b in batches for r in range(len(b['input_ids'])) if b['text_mask'][r].any()]


def test_processes_read_disjoint_records():
  config = data_config(eval_mixture='synthetic:test:30')
  seen = [fingerprints(pipeline.make_dataset(config, 'eval', process_index=p, process_count=2),
                       config) for p in (0, 1)]
  assert len(seen[0]) == len(seen[1]) == 15
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(fingerprints(pipeline.make_dataset(config, 'eval'),
                                                          config))
  train_config = data_config(train_mixture='synthetic:train:40')
  train = [fingerprints(take(iter(pipeline.make_dataset(
      train_config, process_index=p, process_count=2)), 5), train_config) for p in (0, 1)]
  assert len(set(train[0])) == len(set(train[1])) == 10 and not set(train[0]) & set(train[1])
  with pytest.raises(ValueError, match='batch_size=4 is not divisible by the 3 processes'):
    pipeline.make_dataset(config, process_index=0, process_count=3)


def test_eval_pads_the_last_batch():
  config = data_config(eval_mixture='synthetic:test:10')
  batches = list(pipeline.make_dataset(config, 'eval'))
  assert len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last['text_mask'].any(1), [True, True, False, False])
  np.testing.assert_array_equal(last['question_type'][2:], -1)
  assert last['input_ids'].shape == (4, config.data.max_text_len)


@pytest.fixture(scope='module')
def llava_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  write_photos(root)
  (root / 'bad.png').write_bytes(b'not a png')
  good = [{'id': f'good{i}', 'image': 'camera.png',
           'conversations': conversation('<image>\nWhat colour is the circle?', 'red')}
          for i in range(4)]
  bad = [{'id': 'bad', 'image': 'bad.png', 'conversations': conversation('<image>', 'red')},
         {'id': 'gone', 'image': 'gone.png', 'conversations': conversation('<image>', 'red')}]
  long = {'id': 'long', 'image': 'coffee.jpg',
          'conversations': conversation('<image>\nWhat colour is the circle?', 'red',
                                        *['How many shapes are there?', '3'] * 4)}
  write_annotations(root / 'mixed.json', [good[0], bad[0], good[1], good[2], bad[1], good[3]])
  write_annotations(root / 'long.jsonl', [long] * 2)
  return root


def test_bad_records_fail_or_are_skipped_and_counted(llava_files):
  config = data_config(eval_mixture=f'llava:{llava_files / "mixed.json"}')
  with pytest.raises(DataError, match=r"mixed.json record 1 \(id 'bad'\): image .*bad.png"):
    list(pipeline.make_dataset(config, 'eval'))
  config.data.skip_bad_records = True
  batches = list(pipeline.make_dataset(config, 'eval'))
  assert sum(b['num_skipped'].sum() for b in batches) == 2
  assert sum(b['text_mask'].any(1).sum() for b in batches) == 4
  # Records: good0, bad, good1, good2, gone, good3.
  np.testing.assert_array_equal(batches[0]['num_skipped'], [0, 1, 0, 1])


def test_truncation_is_counted(llava_files):
  config = data_config(eval_mixture=f'llava:{llava_files / "long.jsonl"}', max_text_len=48)
  batch = next(iter(pipeline.make_dataset(config, 'eval')))
  np.testing.assert_array_equal(batch['num_truncated'], [1, 1, 0, 0])
  assert batch['text_mask'][:2].all(1).sum() == 0  # whole turns dropped: not filled to the end
  np.testing.assert_array_equal((batch['input_ids'] == 1).sum(1), [1, 1, 0, 0])
  np.testing.assert_array_equal(batch['visual']['token_mask'].any(1), [True, True, False, False])


def test_mixture_of_llava_and_synthetic(llava_files):
  config = data_config(train_mixture=f'synthetic:train:50@3,llava:{llava_files / "long.jsonl"}@1')
  batches = take(iter(pipeline.make_dataset(config)), 4)
  from_llava = sum((b['question_type'] == -1).sum() for b in batches)
  assert from_llava == 4  # one in four
