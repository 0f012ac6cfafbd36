"""LaVi-JAX entry point.

  python -m lavi_jax.main --config=configs/7b.py --workdir=DIR
  python -m lavi_jax.main --config=configs/7b.py --config.dry_run=True

Any config key can be overridden with --config.a.b=value.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from lavi_jax import config as lavi_config
from lavi_jax import dry_run

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Run config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics are written.')


def main(argv):
  del argv
  config = _CONFIG.value
  lavi_config.validate_model(config.model)
  print(dry_run.report(config))
  if not config.dry_run:
    logging.warning('Training is not implemented yet (see the README status table); '
                    'printed the dry run instead.')


if __name__ == '__main__':
  app.run(main)
