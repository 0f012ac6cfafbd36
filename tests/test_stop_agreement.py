"""A stop on one host stops every host at the same step: two processes on 127.0.0.1, SIGTERM to
one of them; both save that step, exit 0, and the resumed run continues exactly."""

import re
import signal
import subprocess
import time

import numpy as np

from lavi_jax.train.metrics import read_metrics
from tests.test_train_loop import ROOT, _finished_checkpoints, _free_port, _losses, _main

STEPS = 12
# A smaller model than tiny's: the three runs here are dominated by start-up and compiling.
EXTRA = [f'--config.train.stages.train.steps={STEPS}', '--config.checkpoint.every=1000',
         '--config.train.stages.train.warmup_steps=4', '--config.model.llm.num_layers=2',
         '--config.model.vision.num_layers=1']


def _start(workdir, logs):
  """The two processes of one run, output in `logs/process_{i}.txt`. The runs share a
  compilation cache (in `logs`): only the first compiles."""
  port = _free_port()
  processes = []
  for pid in range(2):
    cmd, env = _main(workdir, *EXTRA, f'--coordinator_address=127.0.0.1:{port}',
                     '--num_processes=2', f'--process_id={pid}', devices=2)
    env.update(JAX_COMPILATION_CACHE_DIR=str(logs / 'jax_cache'),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    with open(logs / f'process_{pid}.txt', 'w') as out:
      processes.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out,
                                        stderr=subprocess.STDOUT))
  return processes


def _finish(processes, logs) -> list[str]:
  """Waits for both processes; their outputs. Both must exit 0."""
  for p in processes:
    p.wait(timeout=400)
  outputs = [(logs / f'process_{i}.txt').read_text() for i in range(2)]
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path):
  reference = tmp_path / 'reference'
  _finish(_start(reference, tmp_path), tmp_path)

  workdir = tmp_path / 'run'
  processes = _start(workdir, tmp_path)
  deadline = time.time() + 300
  while len(read_metrics(str(workdir))) < 2 and time.time() < deadline:
    assert all(p.poll() is None for p in processes), 'the run ended before the signal'
    time.sleep(0.1)
  processes[1].send_signal(signal.SIGTERM)
  outputs = _finish(processes, tmp_path)
  (step,) = _finished_checkpoints(workdir)
  assert 2 <= step < STEPS
  for out in outputs:  # each process stopped at that step
    assert re.search(rf'Stopped at step {step} of {STEPS}', out), out[-3000:]
  saved = workdir / 'checkpoints' / str(step)
  for pid in range(2):  # both wrote their part of it, and its checksums
    assert (saved / 'data' / f'process_{pid}-of-2.json').exists()
    assert (saved / f'checksums.process_{pid}.json').exists()

  _finish(_start(workdir, tmp_path), tmp_path)
  resumed, expected = _losses(workdir), _losses(reference)
  assert sorted(resumed) == sorted(expected) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in expected], list(expected.values()),
                             rtol=0, atol=1e-6)
