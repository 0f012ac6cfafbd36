"""Checkpoint checksums: a corrupt newest checkpoint is named, set aside and the run resumes
exactly from the previous one; none intact stops the run; read-only uses refuse; a checkpoint
without checksums is read with a warning."""

import logging
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lavi_jax import sharding
from lavi_jax.convert import from_hf, to_torch
from lavi_jax.inference.generator import Generator
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import loop
from lavi_jax.train.metrics import read_metrics
from tests.helpers import random_params, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One config for every run here, so that they share one compiled train step (see `shared_step`).
OVERRIDES = ['--config.data.batch_size=8', '--config.data.max_text_len=48',
             '--config.train.stages.train.steps=4', '--config.train.stages.train.warmup_steps=2',
             '--config.train.log_every=1', '--config.checkpoint.every=2',
             '--config.checkpoint.async_save=False']


def _config():
  config = tiny_config()
  config.data.update(batch_size=8, max_text_len=48)
  config.train.stages.train.update(steps=4, warmup_steps=2)
  config.train.log_every = 1
  config.checkpoint.update(every=2, async_save=False)
  return config


@pytest.fixture(scope='module', autouse=True)
def shared_step():
  """Compiles the train step once for the module: each Trainer would otherwise compile its own."""
  compiled = {}
  real = loop.jit_train_step

  def cached(config, stage, mesh, param_shardings):
    if stage.index not in compiled:
      compiled[stage.index] = real(config, stage, mesh, param_shardings)
    return compiled[stage.index]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(loop, 'jit_train_step', cached)
    yield


def _train(workdir) -> dict[int, float]:
  """Runs (or resumes) the 4-step run in `workdir`; {step: loss}, the last record winning."""
  loop.Trainer(_config(), str(workdir)).run()
  return {r['step']: r['loss'] for r in read_metrics(str(workdir))}


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A workdir with checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp('base')
  _train(workdir)
  assert _listing(workdir) == ['2', '4']
  return workdir


@pytest.fixture(scope='module')
def from_step_2(base, tmp_path_factory):
  """{step: loss} of steps 3 and 4 resumed from checkpoint 2 directly."""
  workdir = tmp_path_factory.mktemp('from2') / 'run'
  shutil.copytree(base, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '4')
  losses = _train(workdir)
  return {s: losses[s] for s in (3, 4)}


def _copy(base, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(base, workdir)
  return workdir


def _listing(workdir):
  return sorted(p.name for p in (pathlib.Path(workdir) / 'checkpoints').iterdir())


def _overwrite(path, offset=100, size=8192):
  """`size` bytes of 0xff at `offset` (within the file)."""
  data = bytearray(path.read_bytes())
  offset = min(offset, len(data) // 2)
  data[offset:offset + size] = b'\xff' * len(data[offset:offset + size])
  path.write_bytes(bytes(data))


def _largest(folder):
  """The largest file under `folder`: array data."""
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _corrupt_largest(folder) -> str:
  path = _largest(folder)
  _overwrite(path)
  return str(path.relative_to(folder))


def _corrupt(step_dir, kind) -> str:
  """Corrupts one file of `step_dir`; returns its name relative to `step_dir`."""
  path = {'array': lambda: _largest(step_dir / 'state' / 'ocdbt.process_0'),
          'data': lambda: step_dir / 'data' / 'process_0-of-1.json',
          'config': lambda: step_dir / 'config' / 'metadata'}[kind]()
  if kind == 'data':  # still valid JSON: the iterator would silently skip records
    path.write_text(path.read_text().replace('"next_index": ', '"next_index": 1'))
  else:
    _overwrite(path)
  return str(path.relative_to(step_dir))


@pytest.mark.parametrize('kind', ['array', 'data', 'config'])
def test_corrupt_newest_resumes_from_previous(base, from_step_2, tmp_path, caplog, kind):
  workdir = _copy(base, tmp_path)
  name = _corrupt(workdir / 'checkpoints' / '4', kind)
  with caplog.at_level(logging.WARNING):
    losses = _train(workdir)
  warning = next(r.getMessage() for r in caplog.records if 'Set aside' in r.getMessage())
  assert 'checkpoint 4' in warning and name in warning and 'checkpoint 2' in warning, warning
  aside = [n for n in _listing(workdir) if n.startswith('4.corrupt-')]
  assert len(aside) == 1 and (workdir / 'checkpoints' / aside[0] / name).exists()
  assert '4' in _listing(workdir)  # saved again by the resumed run
  for step in (3, 4):
    assert losses[step] == from_step_2[step], (step, losses[step], from_step_2[step])


def test_checkpoint_without_checksums_is_read_unverified(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  step_dir = workdir / 'checkpoints' / '4'
  (step_dir / ckpt_lib.MANIFEST.format(0)).unlink()  # killed between the commit and the manifest
  with caplog.at_level(logging.WARNING):
    assert not ckpt_lib.verify(step_dir)
  assert 'no checksums.process_0.json' in caplog.text and 'unverified' in caplog.text
  caplog.clear()
  # Saved before checksums existed.
  metadata = step_dir / '_CHECKPOINT_METADATA'
  metadata.write_text(metadata.read_text().replace('"checksum_manifests": 1', ''))
  with caplog.at_level(logging.WARNING):
    assert not ckpt_lib.verify(step_dir)
  assert 'has no checksums' in caplog.text
  checkpointer = ckpt_lib.Checkpointer(str(workdir), _config())
  assert checkpointer.latest_intact_step() == 4
  checkpointer.close()


def test_no_intact_checkpoint_stops_with_an_error(base, tmp_path):
  workdir = _copy(base, tmp_path)
  names = {step: _corrupt(workdir / 'checkpoints' / str(step), kind)
           for step, kind in ((2, 'array'), (4, 'config'))}
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))
  with pytest.raises(ckpt_lib.CorruptCheckpoint) as error:
    loop.Trainer(_config(), str(workdir))
  for step, name in names.items():
    assert f'checkpoint {step}' in str(error.value) and name in str(error.value)
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')) == before
  # The command line: exit status 1, the message without a traceback.
  result = subprocess.run(
      [sys.executable, '-m', 'lavi_jax.main', '--config=configs/tiny.py',
       f'--workdir={workdir}', *OVERRIDES], cwd=ROOT, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1 and 'No checkpoint' in result.stderr, result.stderr[-2000:]
  assert names[2] in result.stderr and 'Traceback' not in result.stderr
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*')) == before


def test_read_only_uses_refuse_a_corrupt_checkpoint(base, tmp_path):
  workdir = _copy(base, tmp_path)
  name = _corrupt(workdir / 'checkpoints' / '4', 'array')
  for read in (lambda: ckpt_lib.load_params(str(workdir)),
               lambda: Generator.load(str(workdir)),
               lambda: to_torch.Source(str(workdir))):
    with pytest.raises(ckpt_lib.CorruptCheckpoint, match=f'checkpoint 4 .*{name}.*Other '
                                                         r'checkpoints: \[2\]'):
      read()
  config, _ = ckpt_lib.load_params(str(workdir), step=2)
  assert config.checkpoint.every == 2
  assert _listing(workdir) == ['2', '4']  # nothing renamed


def test_init_from_a_training_workdir_starts_from_its_latest_checkpoint(base, tmp_path):
  """init_from takes a training workdir too: its latest checkpoint's parameters; a workdir of
  another model is refused naming the difference; a corrupt one as a read-only use would."""
  config = _config()
  config.init_from = str(base)
  shardings = loop.make_param_shardings(config, sharding.make_mesh(config.mesh))
  started = loop._initial_params(config, shardings)  # pylint: disable=protected-access
  _, latest = ckpt_lib.load_params(str(base))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started), jax.device_get(latest))
  other = _config()
  other.model.viln.delta_clip = 3.0
  other.init_from = str(base)
  with pytest.raises(ckpt_lib.ModelConfigMismatch, match='delta_clip'):
    loop._initial_params(other, shardings)  # pylint: disable=protected-access
  workdir = _copy(base, tmp_path)
  name = _corrupt_largest(workdir / 'checkpoints' / '4')
  config.init_from = str(workdir)
  with pytest.raises(ckpt_lib.CorruptCheckpoint, match=name):
    loop._initial_params(config, shardings)  # pylint: disable=protected-access


def test_init_from_refuses_a_corrupt_conversion(tmp_path):
  config = _config()
  converted = tmp_path / 'converted'
  from_hf.save_converted(converted, config.model, random_params(config.model))
  config.init_from = str(converted)
  shardings = loop.make_param_shardings(config, sharding.make_mesh(config.mesh))
  loop._initial_params(config, shardings)  # pylint: disable=protected-access
  name = _corrupt_largest(converted)
  with pytest.raises(ckpt_lib.CorruptCheckpoint, match=f'convert.from_hf output .*{name}'):
    loop._initial_params(config, shardings)  # pylint: disable=protected-access
  for load in (Generator.load, to_torch.Source):
    with pytest.raises(ckpt_lib.CorruptCheckpoint, match=name):
      load(str(converted))
