"""LaVi-JAX entry point: trains (and evaluates) a config, or prints its dry run.

  python -m lavi_jax.main --config=configs/tiny.py --workdir=DIR
  python -m lavi_jax.main --config=configs/7b.py --workdir=gs://BUCKET/run
  python -m lavi_jax.main --config=configs/7b.py --config.dry_run=True

Any config key can be overridden with --config.a.b=value. Every process of a multi-host job
runs the same command; `jax.distributed` starts automatically on Cloud TPU and Slurm, or with
--coordinator_address, --num_processes and --process_id.

Before anything heavy is built, the run's config and the files it names are checked
(lavi_jax/preflight.py); what is wrong (for a real-scale config without a starting checkpoint,
data or tokenizer: what it needs and the commands that make it) is printed without a traceback,
with exit status 1.
"""

import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lavi_jax import config as lavi_config
from lavi_jax import distributed, dry_run, preflight
from lavi_jax.data.errors import DataError
from lavi_jax.train import checkpoint as ckpt_lib
from lavi_jax.train import metrics
from lavi_jax.train.loop import Trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Run config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics are written.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')

# Errors that say what to fix in the config or in the files it names: shown without traceback.
SETUP_ERRORS = (lavi_config.ConfigError, FileNotFoundError, DataError,
                ckpt_lib.ModelConfigMismatch, ckpt_lib.CorruptCheckpoint)


def train_and_evaluate(config, workdir: str, trainer: Trainer | None = None):
  """Trains all stages (resuming from `workdir`) with `trainer` (default: a new one), then
  evaluates on the held-out synthetic split."""
  start = time.perf_counter()
  trainer = trainer or Trainer(config, workdir)
  step = trainer.run()
  train_seconds = time.perf_counter() - start
  if step < trainer.total_steps:
    logging.warning('Stopped at step %d of %d; rerun the same command to resume.', step,
                 trainer.total_steps)
    return
  curves = metrics.plot_curves(workdir)
  if not config.data.eval_mixture.startswith('synthetic'):
    return
  if jax.process_count() > 1:
    logging.info('Held-out synthetic evaluation runs single-process only; skipped.')
    return
  from lavi_jax.eval import synthetic  # pylint: disable=import-outside-toplevel
  table = synthetic.evaluate(config, trainer.state.params)
  synthetic.write(workdir, table)
  print(f'\nHeld-out evaluation after {step} steps ({train_seconds:.0f} s of training):')
  print(synthetic.format_table(table))
  if curves:
    print(f'Curves: {curves}')


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # keep library INFO logs off the progress bar
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not (config.dry_run or workdir):
    raise app.UsageError('--workdir is required for training (or set --config.dry_run=True)')
  try:
    if config.dry_run:
      lavi_config.validate_model(config.model)
      print(dry_run.report(config))
      return
    preflight.check(config, config_flags.get_config_filename(flags.FLAGS['config']), workdir)
    trainer = Trainer(config, workdir)
  except SETUP_ERRORS as e:
    sys.exit(str(e))  # on stderr, exit status 1
  train_and_evaluate(config, workdir, trainer)


if __name__ == '__main__':
  app.run(main)
