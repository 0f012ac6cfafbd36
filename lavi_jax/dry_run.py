"""Dry run: build a model abstractly and report its parameters by group and per device.

Nothing is allocated: shapes come from `jax.eval_shape`, per-device bytes from the logical
axis rules and the configured mesh shape (which need not match the devices at hand). It counts
parameter bytes only, not optimizer state or activations: the memory check is
`python -m lavi_jax.compile`, which compiles the real train step for a TPU topology.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from lavi_jax import sharding
from lavi_jax.models import lavi

GROUPS = ('vision', 'projector', 'conditioners', 'llm')


def group_of(path: tuple[str, ...]) -> str:
  """Parameter group of a parameter path (tuple of keys)."""
  if path[0] == 'viln_context' or 'conditioner' in path:
    return 'conditioners'
  if path[0] == 'vit':
    return 'vision'
  if path[0] in ('projector', 'frame_index'):
    return 'projector'
  return 'llm'


def abstract_params(model: ml_collections.ConfigDict):
  """Boxed abstract parameter tree (ShapeDtypeStructs with logical axis names)."""
  return jax.eval_shape(functools.partial(lavi.init_params, model), jax.random.key(0))


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', k)) for k in path)


def count_by_group(params) -> dict[str, int]:
  """{group: number of parameters} for an (unboxed or abstract) parameter tree."""
  counts = dict.fromkeys(GROUPS, 0)
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
    counts[group_of(_path_keys(path))] += math.prod(leaf.shape)
  return counts


def report(config: ml_collections.ConfigDict) -> str:
  """The dry-run table: parameters per group and bytes per device under the mesh."""
  boxed = abstract_params(config.model)
  counts = count_by_group(boxed)
  total = sum(counts.values())
  num_devices = config.mesh.num_devices or jax.device_count()
  mesh_shape = sharding.resolve_mesh_shape(config.mesh, num_devices)
  rules = sharding.rules(config.mesh)
  per_device = sharding.per_device_bytes(boxed, rules, mesh_shape)
  itemsize = np.dtype(config.model.param_dtype).itemsize
  lines = [f'{"group":<14}{"parameters":>16}{"share":>9}', '-' * 39]
  for group in GROUPS:
    lines.append(f'{group:<14}{counts[group]:>16,}{counts[group] / total:>9.2%}')
  lines += ['-' * 39, f'{"total":<14}{total:>16,}  ({total / 1e9:.3f}B)', '',
            f'mesh (data, fsdp, tensor) = {mesh_shape} on {num_devices} devices, '
            f'rules {config.mesh.rules!r}, params in {config.model.param_dtype}',
            f'parameter bytes per device: {per_device / 2**30:.3f} GiB '
            f'(unsharded: {total * itemsize / 2**30:.3f} GiB)',
            'Parameters only: optimizer state and activation memory are not checked.',
            'Memory check of the real train step per chip: python -m lavi_jax.compile '
            '--config=... --topology=v5p-64']
  return '\n'.join(lines)
