"""Image decoding (modes, bad files), SigLIP normalisation, AnyRes tiling, PyAV video decoding."""

import numpy as np
import pytest
from PIL import Image

from lavi_jax.data import image, video
from lavi_jax.data.errors import DataError
from tests.data_files import write_photos, write_video


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  return write_photos(tmp_path_factory.mktemp('photos'))


def test_image_modes_decode_to_rgb(photos):
  from skimage import data
  camera, astronaut = data.camera(), data.astronaut().astype(np.float64)
  for name, path in photos.items():
    decoded = image.decode_image(path)
    assert decoded.mode == 'RGB', name
  grey = np.asarray(image.decode_image(photos['camera.png']))
  np.testing.assert_array_equal(grey, np.repeat(camera[:, :, None], 3, axis=2))
  # 16-bit grey: v * 257 scales back to v.
  assert Image.open(photos['grey16.png']).mode.startswith('I')
  np.testing.assert_array_equal(np.asarray(image.decode_image(photos['grey16.png']))[..., 0],
                                camera)
  # Alpha 128 over white: (x + 255) / 2.
  rgba = np.asarray(image.decode_image(photos['rgba.png']), np.float64)
  np.testing.assert_allclose(rgba, (astronaut * 128 + 255 * 127) / 255, atol=1)
  palette = np.asarray(image.decode_image(photos['palette.png']), np.float64)
  assert np.abs(palette - astronaut).mean() < 8
  assert image.decode_image(photos['coffee.jpg']).size == (600, 400)


def test_transparent_palette_and_grey_alpha_composite_on_white():
  p = Image.new('P', (4, 4), 0)
  p.putpalette([10, 20, 30] * 256)
  p.info['transparency'] = 0
  assert np.asarray(image.to_rgb(p)).min() == 255
  la = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)]), 'LA')
  assert np.asarray(image.to_rgb(la)).min() == 255


def test_decode_errors_name_the_file(tmp_path):
  corrupt = tmp_path / 'corrupt.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  with pytest.raises(DataError, match='corrupt.jpg cannot be decoded'):
    image.decode_image(corrupt)
  with pytest.raises(DataError, match='missing.png does not exist'):
    image.decode_image(tmp_path / 'missing.png')
  with pytest.raises(DataError, match='^image reference <int> is not a path, bytes or array'):
    image.decode_image(42)


def test_truncated_image_is_an_error(photos, tmp_path):
  data = photos['coffee.jpg'].read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match='cut.jpg cannot be decoded'):
    image.decode_image(tmp_path / 'cut.jpg')


def test_resize_keeps_uint8_pixels():
  pixels = image.resize(Image.new('RGB', (10, 20), (255, 0, 128)), 8)
  assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels[0, 0], [255, 0, 128])


@pytest.mark.parametrize('size, grids, expected', [
    ((512, 512), [(1, 1), (2, 2), (3, 3)], (3, 3)),  # more pixels kept
    ((600, 400), [(1, 1), (1, 2), (2, 1), (1, 3)], (1, 2)),  # (1, 3) keeps as much, pads more
    ((100, 300), [(1, 1), (1, 2), (2, 1), (3, 1)], (3, 1)),  # tall image: one column
    ((30, 30), [(1, 1), (2, 2)], (1, 1)),  # small: (2, 2) keeps no more, pads more
])
def test_select_grid(size, grids, expected):
  assert image.select_grid(*size, grids, 64) == expected


def test_anyres_crops(photos):
  astronaut = image.decode_image(photos['astronaut.png'])
  grids = image.DEFAULT_GRIDS
  crops = image.anyres_crops(astronaut, 64, grids, max_crops=10)
  assert crops.shape == (10, 64, 64, 3) and crops.dtype == np.uint8
  np.testing.assert_array_equal(crops[0], image.resize(astronaut, 64))
  assert image.anyres_crops(astronaut, 64, grids, max_crops=5).shape == (5, 64, 64, 3)
  assert image.anyres_crops(astronaut, 64, grids, max_crops=1).shape == (1, 64, 64, 3)
  # A 2:1 image in one crop: centred, black bars above and below.
  wide = Image.new('RGB', (128, 64), (255, 255, 255))
  crops = image.anyres_crops(wide, 64, [(1, 1)], max_crops=2)
  assert crops.shape == (2, 64, 64, 3)
  np.testing.assert_array_equal(crops[1, :16], 0)
  np.testing.assert_array_equal(crops[1, 16:48], 255)
  np.testing.assert_array_equal(crops[1, 48:], 0)
  # Grid crops are row-major pieces of the image (here already of the grid's size).
  quarters = np.zeros((64, 128, 3), np.uint8)
  quarters[:32, 64:] = 255  # top right white, the rest black
  crops = image.anyres_crops(Image.fromarray(quarters), 64, [(2, 4), (1, 2)], max_crops=3)
  np.testing.assert_array_equal(crops[1], 0)
  np.testing.assert_array_equal(crops[2][:32], 255)
  np.testing.assert_array_equal(crops[2][32:], 0)


def test_video_uniform_sampling(tmp_path):
  path = write_video(tmp_path / 'clip.mp4', num_frames=20)
  frames = video.decode_video(path, 4)
  assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(video.uniform_indices(20, 4), [0, 6, 12, 19])
  np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [0, 72, 144, 228], atol=4)
  np.testing.assert_array_equal(video.decode_video(path.read_bytes(), 4), frames)
  # Short videos give all their frames (the pipeline masks the rest).
  short = write_video(tmp_path / 'short.mp4', num_frames=3)
  assert video.decode_video(short, 8).shape == (3, 32, 32, 3)
  resized = video.video_frames(path, 4, 16)
  assert resized.shape == (4, 16, 16, 3) and resized.dtype == np.uint8
  arrays = np.arange(10)[:, None, None, None] * np.ones((10, 2, 2, 3), np.uint8)
  np.testing.assert_array_equal(video.decode_video(arrays, 4)[:, 0, 0, 0], [0, 3, 6, 9])


def test_bad_videos_name_the_file(tmp_path):
  data = write_video(tmp_path / 'clip.mp4', num_frames=20).read_bytes()
  (tmp_path / 'cut.mp4').write_bytes(data[:int(len(data) * 0.8)])
  with pytest.raises(DataError, match='cut.mp4 is truncated: frame 12 of 20'):
    video.decode_video(tmp_path / 'cut.mp4', 4)
  (tmp_path / 'cut_early.mp4').write_bytes(data[:len(data) // 3])
  with pytest.raises(DataError, match='cut_early.mp4'):
    video.decode_video(tmp_path / 'cut_early.mp4', 4)
  (tmp_path / 'garbage.mp4').write_bytes(b'\x00' * 1000)
  with pytest.raises(DataError, match='garbage.mp4 cannot be decoded'):
    video.decode_video(tmp_path / 'garbage.mp4', 4)
  with pytest.raises(DataError, match='nowhere.mp4 does not exist'):
    video.decode_video(tmp_path / 'nowhere.mp4', 4)
