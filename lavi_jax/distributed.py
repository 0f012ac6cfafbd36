"""Multi-host start-up: `jax.distributed.initialize()` before any device is touched.

Automatic on Cloud TPU pods and Slurm / Open MPI jobs (JAX's own cluster detection); explicit
with a coordinator address, process count and process id otherwise (e.g. CPU tests on
127.0.0.1).
"""

from __future__ import annotations

import os

import jax
from absl import logging


def _int_env(name: str) -> int:
  try:
    return int(os.environ.get(name, '1'))
  except ValueError:
    return 1


def cluster_detected() -> bool:
  """Whether this process is one of several in a TPU pod, Slurm or Open MPI job."""
  return (',' in os.environ.get('TPU_WORKER_HOSTNAMES', '')
          or bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'))
          or _int_env('SLURM_NTASKS') > 1
          or _int_env('OMPI_COMM_WORLD_SIZE') > 1)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None):
  """Initialises multi-process JAX when asked explicitly or when a cluster is detected."""
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
