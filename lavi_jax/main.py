"""LaVi-JAX entry point: trains (and evaluates) a config, or prints its dry run.

  python -m lavi_jax.main --config=configs/tiny.py --workdir=DIR
  python -m lavi_jax.main --config=configs/7b.py --workdir=gs://BUCKET/run
  python -m lavi_jax.main --config=configs/7b.py --config.dry_run=True

Any config key can be overridden with --config.a.b=value. Every process of a multi-host job
runs the same command; `jax.distributed` starts automatically on Cloud TPU and Slurm, or with
--coordinator_address, --num_processes and --process_id.
"""

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lavi_jax import config as lavi_config
from lavi_jax import distributed, dry_run
from lavi_jax.train import metrics
from lavi_jax.train.loop import Trainer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Run config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics are written.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0, for multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')


def train_and_evaluate(config, workdir: str):
  """Trains all stages (resuming from `workdir`), then evaluates on the held-out split."""
  start = time.perf_counter()
  trainer = Trainer(config, workdir)
  step = trainer.run()
  train_seconds = time.perf_counter() - start
  if step < trainer.total_steps:
    logging.warning('Stopped at step %d of %d; rerun the same command to resume.', step,
                 trainer.total_steps)
    return
  curves = metrics.plot_curves(workdir)
  if jax.process_count() > 1 or not config.data.eval_mixture.startswith('synthetic'):
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
  config = _CONFIG.value
  if config.dry_run:
    lavi_config.validate_model(config.model)
    print(dry_run.report(config))
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required for training (or set --config.dry_run=True)')
  train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
