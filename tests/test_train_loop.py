"""The training loop end to end: exact resume after a kill, SIGTERM, NaN stop, init_from,
restoring onto another mesh, a refused model mismatch and a falling loss (two processes:
test_stop_agreement.py)."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import loop
from lavi_jax.train.metrics import read_metrics
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ['--config.data.batch_size=8', '--config.data.max_text_len=48',
         '--config.train.log_every=1', '--config.checkpoint.async_save=False']


def _main(workdir, *extra, devices=1):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  return [sys.executable, '-m', 'lavi_jax.main', '--config=configs/tiny.py',
          f'--workdir={workdir}', *SMALL, *extra], env


def _losses(workdir):
  """{step: loss}, the last record of a step winning (a resumed run rewrites later steps)."""
  return {r['step']: r['loss'] for r in read_metrics(str(workdir))}


def _finished_checkpoints(workdir):
  root = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in root.glob('*') if p.name.isdigit()) if root.exists() else []


STEPS = ['--config.train.stages.train.steps=24', '--config.checkpoint.every=12',
         '--config.train.stages.train.warmup_steps=4']


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """{step: loss} of an uninterrupted 24-step run."""
  workdir = tmp_path_factory.mktemp('straight')
  cmd, env = _main(workdir, *STEPS)
  subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
  return _losses(workdir)


def test_short_tiny_run_learns(straight_run):
  losses = [straight_run[s] for s in sorted(straight_run)]
  assert sorted(straight_run) == list(range(1, 25))
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_resume_after_kill_is_exact(tmp_path, straight_run):
  cmd, env = _main(tmp_path, *STEPS)
  process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while 12 not in _finished_checkpoints(tmp_path) and time.time() < deadline:
    assert process.poll() is None, 'the run ended before its first checkpoint'
    time.sleep(0.1)
  process.kill()
  process.wait()
  assert 24 not in _finished_checkpoints(tmp_path)
  subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
  resumed = _losses(tmp_path)
  assert sorted(resumed) == list(range(1, 25))
  for step in range(1, 25):
    assert abs(resumed[step] - straight_run[step]) <= 1e-6, (step, resumed[step],
                                                             straight_run[step])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  cmd, env = _main(tmp_path, '--config.train.stages.train.steps=100000',
                   '--config.checkpoint.every=100000')
  process = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while len(read_metrics(str(tmp_path))) < 3 and time.time() < deadline:
    assert process.poll() is None
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  saved = _finished_checkpoints(tmp_path)
  assert saved and saved[-1] >= 3
  assert 'rerun the same command to resume' in stderr


def _trainer_config(tmp_path, steps=4, **mesh):
  config = tiny_config()
  config.data.update(batch_size=8, max_text_len=48)
  config.train.stages.train.steps = steps
  config.train.log_every = 1
  config.checkpoint.async_save = False
  config.checkpoint.every = 2
  config.mesh.update(mesh or dict(data=1, fsdp=-1, tensor=1))
  return config


def test_nonfinite_loss_stops_before_saving(tmp_path, monkeypatch):
  real = loop.global_batch

  def poisoned(batch, mesh):
    pixels = np.full(batch['visual']['pixels'].shape, np.nan, np.float32)  # float is allowed
    batch = dict(batch, visual=dict(batch['visual'], pixels=pixels))
    return real(batch, mesh)

  monkeypatch.setattr(loop, 'global_batch', poisoned)
  config = _trainer_config(tmp_path)
  with pytest.raises(loop.NonFiniteLoss, match='at step 1'):
    loop.Trainer(config, str(tmp_path)).run()
  assert not _finished_checkpoints(tmp_path)


def test_restore_onto_another_mesh_and_refuse_another_model(tmp_path):
  config = _trainer_config(tmp_path, data=1, fsdp=8, tensor=1)
  trainer = loop.Trainer(config, str(tmp_path))
  trainer.run()
  expected = jax.device_get(trainer.state.params)
  # Same run, read back on a (2, 2, 2) tensor-parallel mesh.
  other = _trainer_config(tmp_path, data=2, fsdp=2, tensor=2)
  other.mesh.rules = 'fsdp_tp'
  restored = loop.Trainer(other, str(tmp_path))
  assert int(restored.state.step) == 4
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.state.params)),
                  jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  wrong = _trainer_config(tmp_path)
  wrong.model.llm.num_layers = 2
  with pytest.raises(ckpt_lib.ModelConfigMismatch, match='model.llm.num_layers: checkpoint has 4'):
    loop.Trainer(wrong, str(tmp_path))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_init_from_a_converted_checkpoint(tmp_path):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from lavi_jax.convert import from_hf  # pylint: disable=import-outside-toplevel
  from lavi_jax.models import init_params  # pylint: disable=import-outside-toplevel
  from tests.helpers import perturb  # pylint: disable=import-outside-toplevel
  config = _trainer_config(tmp_path)
  params = perturb(nn.unbox(init_params(config.model, jax.random.key(7))))
  expected = jax.device_get(params)
  from_hf.save_converted(tmp_path / 'converted', config.model, params)
  config.init_from = str(tmp_path / 'converted')
  trainer = loop.Trainer(config, str(tmp_path / 'run'))
  for a, b in zip(jax.tree.leaves(jax.device_get(trainer.state.params)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  config.model.llm.rope_theta = 500.0
  with pytest.raises(ckpt_lib.ModelConfigMismatch, match='rope_theta'):
    loop.Trainer(config, str(tmp_path / 'run2'))
