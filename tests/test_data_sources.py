"""Sources: LLaVA JSON/JSONL with real photos and a video, bad data, the synthetic shapes,
the TFDS ArrayRecord builder, and weighted mixtures."""

import collections
import json
import pickle

import numpy as np
import pytest

from lavi_jax import config as lavi_config
from lavi_jax.data import chat, image, mixture, synthetic, tfds_data
from lavi_jax.data.errors import DataError
from lavi_jax.data.llava import LlavaSource
from lavi_jax.data.sample import ExampleSpec, Preprocess, Skipped
from tests.data_files import conversation, write_annotations, write_photos, write_video

SPEC = ExampleSpec(max_text_len=64, image_size=32, max_crops=5, max_images=3,
                   grids=image.DEFAULT_GRIDS, num_frames=4)
RECORDS = [
    {'id': 'single', 'image': 'astronaut.png',
     'conversations': conversation('<image>\nWhat colour is the circle?', 'red')},
    {'id': 'multi', 'image': ['coffee.jpg', 'camera.png'], 'video': 'clip.mp4',
     'conversations': conversation('<image>\n<video>\nIs there a red circle?', 'yes',
                                   '<image>\nHow many shapes are there?', '2')},
    {'id': 'text', 'conversations': conversation('How many shapes are there?', '3')},
]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('llava')
  write_photos(root / 'images')
  (root / 'videos').mkdir()
  write_video(root / 'videos' / 'clip.mp4')
  return root


def preprocess(skip=False):
  return Preprocess(SPEC, synthetic.synthetic_tokenizer(), chat.CHATML, skip)


@pytest.mark.parametrize('suffix', ['.json', '.jsonl'])
def test_llava_source_reads_images_videos_and_text(files, suffix):
  path = write_annotations(files / f'data{suffix}', RECORDS)
  source = LlavaSource(path, str(files / 'images'), str(files / 'videos'))
  assert len(source) == 3
  source = pickle.loads(pickle.dumps(source))
  record = source[1]
  assert record['id'] == 'multi' and record['images'][1] == str(files / 'images' / 'camera.png')
  assert record['origin'] == (f'{path} line 2' if suffix == '.jsonl' else f'{path} record 1')
  single, multi, text = (preprocess().map(source[i]) for i in range(3))
  # One image: AnyRes (512 x 512 -> 2 x 2 grid + base), all crops of item 0, no padding.
  assert single['frames'].shape == (5, 32, 32, 3) and single['frames'].dtype == np.uint8
  assert not single['frame_item'].any() and not single['frame_video'].any()
  # Items in placeholder order: coffee 0, the video 1 (4 frames), camera 2; one base crop per
  # image.
  np.testing.assert_array_equal(multi['frame_item'], [0, 1, 1, 1, 1, 2])
  np.testing.assert_array_equal(multi['frame_video'], [0, 1, 1, 1, 1, 0])
  assert len(text['frames']) == 0 and text['question_type'] == -1
  np.testing.assert_array_equal(multi['frames'][5],
                                image.resize(image.decode_image(files / 'images/camera.png'), 32))


def test_relative_paths_default_to_the_annotation_folder(files):
  path = write_annotations(files / 'images' / 'local.json', RECORDS[:1])
  assert LlavaSource(path)[0]['images'] == [str(files / 'images' / 'astronaut.png')]


def test_truncated_conversation_keeps_only_its_items(files):
  path = write_annotations(files / 'long.json', RECORDS[1:2])
  record = LlavaSource(path, str(files / 'images'), str(files / 'videos'))[0]
  short = Preprocess(ExampleSpec(40, 32, 5, 3, image.DEFAULT_GRIDS, 4),
                     synthetic.synthetic_tokenizer(), chat.CHATML).map(record)
  assert short['num_truncated'] == 1 and short['text_mask'].sum() <= 40
  np.testing.assert_array_equal(short['frame_item'], [0, 1, 1, 1, 1])  # camera gone
  np.testing.assert_array_equal(short['frame_video'], [0, 1, 1, 1, 1])


def bad_records(files):
  cut = (files / 'videos' / 'clip.mp4').read_bytes()
  (files / 'videos' / 'cut.mp4').write_bytes(cut[:int(len(cut) * 0.8)])
  (files / 'images' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 garbage')
  return [
      ({'id': 'corrupt', 'image': 'corrupt.jpg', 'conversations': conversation('<image>', 'a')},
       'corrupt.jpg cannot be decoded'),
      ({'id': 'cut', 'video': 'cut.mp4', 'conversations': conversation('<video>', 'a')},
       'cut.mp4 is truncated'),
      ({'id': 'missing', 'image': 'missing.png', 'conversations': conversation('<image>', 'a')},
       'missing.png does not exist'),
      ({'id': 'more', 'image': 'camera.png', 'conversations': conversation('<image><image>', 'a')},
       '2 <image> placeholders but 1 images'),
      ({'id': 'fewer', 'video': 'clip.mp4', 'conversations': conversation('no video', 'a')},
       '0 <video> placeholders but 1 videos'),
      ({'id': 'roles', 'conversations': [{'from': 'gpt', 'value': 'a'}]}, 'must end with a gpt'),
  ]


def test_bad_records_name_the_file_and_record(files):
  cases = bad_records(files)
  path = write_annotations(files / 'bad.json', [r for r, _ in cases])
  source = LlavaSource(path, str(files / 'images'), str(files / 'videos'))
  for index, (record, message) in enumerate(cases):
    with pytest.raises(DataError, match=rf"bad.json record {index} \(id '{record['id']}'\).*"
                                        f'{message}'):
      preprocess().map(source[index])
    skipped = preprocess(skip=True).map(source[index])
    assert isinstance(skipped, Skipped) and message in skipped.reason


def test_malformed_annotation_files_name_the_line(files):
  lines = [json.dumps(r) for r in RECORDS] + ['{"id": "broken", "conversations": [']
  lines.insert(1, '[1, 2]')
  (files / 'broken.jsonl').write_text('\n'.join(lines) + '\n')
  with pytest.raises(DataError, match='broken.jsonl line 2: malformed JSONL record: expected a'):
    LlavaSource(files / 'broken.jsonl')
  source = LlavaSource(files / 'broken.jsonl', skip_bad_records=True)
  assert (len(source), source.num_skipped) == (3, 2)
  assert source[2]['origin'].endswith('broken.jsonl line 4')
  (files / 'broken.json').write_text('[\n {"id": 1},\n {"id": 2,,}\n]')
  with pytest.raises(DataError, match='broken.json: malformed JSON at line 3 column 11'):
    LlavaSource(files / 'broken.json', skip_bad_records=True)
  with pytest.raises(DataError, match='nothing.json does not exist'):
    LlavaSource(files / 'nothing.json')


def test_synthetic_is_deterministic_and_held_out():
  a, b = synthetic.SyntheticShapes('train', 50, video_fraction=0.3), pickle.loads(
      pickle.dumps(synthetic.SyntheticShapes('train', 50, video_fraction=0.3)))
  test = synthetic.SyntheticShapes('test', 50, video_fraction=0.3)
  for i in (0, 7, 49):
    x, y = a[i], b[i]
    assert x['conversations'] == y['conversations'] and x['question_type'] == y['question_type']
    for key in ('images', 'videos'):
      assert len(x[key]) == len(y[key])
      for u, v in zip(x[key], y[key]):
        np.testing.assert_array_equal(u, v)
  def pixels(source):
    return {(r['images'] or r['videos'])[0].tobytes() for r in map(source.__getitem__, range(50))}

  assert len(pixels(a)) == 50 and not pixels(a) & pixels(test)
  with pytest.raises(IndexError):
    a[50]


def test_synthetic_question_types_restrict_the_draw():
  only = synthetic.SyntheticShapes('train', 200, video_fraction=0.3, question_types=('position',))
  assert {synthetic.QUESTION_TYPES[only[i]['question_type']] for i in range(200)} == {'position'}
  mixed = synthetic.SyntheticShapes('train', 200, video_fraction=0.3,
                                    question_types=('count', 'motion'))
  assert {synthetic.QUESTION_TYPES[mixed[i]['question_type']] for i in range(200)} == {
      'count', 'motion'}
  every = synthetic.SyntheticShapes('train', 20, video_fraction=0.3,
                                    question_types=synthetic.QUESTION_TYPES)
  default = synthetic.SyntheticShapes('train', 20, video_fraction=0.3)
  assert [every[i]['conversations'] for i in range(20)] == [
      default[i]['conversations'] for i in range(20)]
  with pytest.raises(ValueError, match='choose one or more'):
    synthetic.SyntheticShapes('train', 1, question_types=('shape',))
  config = lavi_config.base_config()
  config.data.synthetic.question_types = 'position'
  assert mixture.synthetic_question_types(config.data.synthetic) == ('position',)
  config.data.synthetic.question_types = 'count,shape'
  with pytest.raises(lavi_config.ConfigError, match=r'data\.synthetic\.question_types'):
    lavi_config.validate(config, num_devices=1)


def _centroid(pixels):
  ys, xs = np.nonzero((pixels < 250).any(axis=-1))
  return xs.mean() / pixels.shape[1], ys.mean() / pixels.shape[0]


def test_synthetic_answers_are_balanced_and_right():
  source = synthetic.SyntheticShapes('train', 1000, image_size=48, video_frames=4,
                                     video_fraction=0.2)
  counts = collections.defaultdict(collections.Counter)
  for i in range(len(source)):
    record = source[i]
    kind = synthetic.QUESTION_TYPES[record['question_type']]
    question, answer = (t['value'] for t in record['conversations'])
    counts[kind][answer] += 1
    if kind == 'position':
      x, y = _centroid(record['images'][0])
      assert {'left': x < 0.4, 'right': x > 0.6, 'top': y < 0.4, 'bottom': y > 0.6}[answer]
    elif kind == 'motion':
      (x0, y0), (x1, y1) = map(_centroid, record['videos'][0][[0, -1]])
      assert {'left': x1 < x0, 'right': x1 > x0, 'up': y1 < y0, 'down': y1 > y0}[answer]
      assert record['videos'][0].shape == (4, 48, 48, 3)
    elif kind == 'colour':
      rgb = np.array(synthetic.COLOURS[answer])
      assert (np.abs(record['images'][0].astype(int) - rgb).sum(-1) < 10).sum() > 10
    assert question.startswith('<video>' if kind == 'motion' else '<image>')
  assert set(counts) == set(synthetic.QUESTION_TYPES)
  assert 150 < sum(counts['motion'].values()) < 250
  for kind, answers in counts.items():
    assert set(answers) == set(synthetic.ANSWERS[kind])
    expected = sum(answers.values()) / len(answers)
    assert all(abs(n - expected) < 0.35 * expected for n in answers.values()), (kind, answers)
  assert synthetic.chance() == {'colour': 0.25, 'count': 1 / 3, 'position': 0.25,
                                'yes_no': 0.5, 'motion': 0.25}


def test_tfds_array_record_builder_round_trip(tmp_path):
  config = tfds_data.ShapesConfig(name='small', train_size=6, test_size=3, image_size=32,
                                  video_frames=4, video_fraction=0.5)
  builder = tfds_data.SyntheticShapesBuilder(config=config, data_dir=str(tmp_path),
                                             file_format='array_record')
  builder.download_and_prepare()
  reference = synthetic.SyntheticShapes('train', 6, 0, 32, 4, 0.5)
  by_dir = tfds_data.TfdsSource(str(builder.data_dir), 'train')
  by_name = tfds_data.TfdsSource('synthetic_shapes/small', 'train', str(tmp_path))
  assert len(by_dir) == len(by_name) == 6
  for source in (by_dir, pickle.loads(pickle.dumps(by_name))):
    for i in range(6):
      record = source[i]
      expected = reference[int(record['id'].rsplit('/', 1)[1])]
      assert record['conversations'] == expected['conversations']
      assert record['question_type'] == expected['question_type']
      for key in ('images', 'videos'):
        assert len(record[key]) == len(expected[key])
        for u, v in zip(record[key], expected[key]):
          np.testing.assert_array_equal(u, v)
  assert len(tfds_data.TfdsSource(str(builder.data_dir), 'test')) == 3
  assert preprocess().map(by_dir[0])['text_mask'].any()


def test_parse_mixture():
  entries = mixture.parse_mixture('synthetic:train:100@3, llava:/a@b/x.json,tfds:d/s#train[:5]@0.5')
  assert entries == [mixture.SourceSpec('synthetic', 'train:100', 3.0),
                     mixture.SourceSpec('llava', '/a@b/x.json', 1.0),
                     mixture.SourceSpec('tfds', 'd/s#train[:5]', 0.5)]
  for bad, message in [('', 'empty'), ('webdataset:x', 'bad mixture entry'),
                       ('tfds:name', 'name a split'), ('llava:x.json@0', 'positive')]:
    with pytest.raises(ValueError, match=message):
      mixture.parse_mixture(bad)


def test_mixture_weights_and_per_epoch_shuffles():
  a, b = [('a', i) for i in range(50)], [('b', i) for i in range(100)]
  mixed = mixture.shard_and_mix([a, b], [3, 1], seed=1, train=True)
  first = [mixed[i] for i in range(400)]
  assert sum(s == 'a' for s, _ in first) == 300
  assert first == [mixture.shard_and_mix([a, b], [3, 1], seed=1, train=True)[i]
                   for i in range(400)]
  a_order = [i for s, i in first if s == 'a']
  assert sorted(a_order[:50]) == list(range(50))  # one epoch of a
  assert a_order[:50] != list(range(50)) and a_order[:50] != a_order[50:100]  # shuffled anew
  once = mixture.shard_and_mix([a, b], [3, 1], seed=1, train=False)
  assert list(once) == a + b
