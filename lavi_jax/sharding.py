"""Device mesh `(data, fsdp, tensor)`, logical-axis rule presets and sharded parameter creation.

Every parameter and large activation carries logical axis names (see DESIGN.md §3); a rule
preset maps them to mesh axes:
- `dp`: parameters replicated, batch split over `data` x `fsdp`.
- `fsdp`: as `dp`, but every parameter is split over `fsdp` along its embedding axis (ZeRO-3).
- `fsdp_tp`: as `fsdp`, plus tensor parallelism: MLP, head and vocabulary axes over `tensor`.

A parameter dimension that a mesh axis does not divide (e.g. 1152 = 2^7 x 9 over fsdp=256) gives
that axis to another dimension of the parameter it divides, or else replicates the parameter
along it (`fit_spec`), wherever parameter shardings are made.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH = ('data', 'fsdp')

_REPLICATED = [
    ('length', None), ('layers', None), ('norm', None), ('head_dim', None),
    ('cond_dim', None), ('frames', None), ('vis_tokens', None),
]
_FSDP = [('embed', 'fsdp'), ('vis_embed', 'fsdp'), ('ctx_embed', 'fsdp')]
_TENSOR = [(name, 'tensor') for name in (
    'mlp', 'heads', 'kv_heads', 'vocab', 'vis_mlp', 'vis_heads', 'cond_heads', 'cond_mlp')]

# The order matters: the first rule whose mesh axes are still free wins, so `batch` (listed
# first) keeps `fsdp` for activations while parameters, which have no batch axis, use it.
RULE_PRESETS: dict[str, list[tuple[str, Any]]] = {
    'dp': [('batch', BATCH)] + _REPLICATED,
    'fsdp': [('batch', BATCH)] + _FSDP + _REPLICATED,
    'fsdp_tp': [('batch', BATCH)] + _FSDP + _TENSOR + _REPLICATED,
}


def rules(mesh_config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  if mesh_config.rules not in RULE_PRESETS:
    raise ValueError(f'config.mesh.rules: {mesh_config.rules!r} is not one of '
                     f'{sorted(RULE_PRESETS)}')
  return RULE_PRESETS[mesh_config.rules]


def resolve_mesh_shape(mesh_config: ml_collections.ConfigDict,
                       num_devices: int | None = None) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with a -1 entry filled in; checked against `num_devices`."""
  sizes = [mesh_config[a] for a in MESH_AXES]
  if num_devices is None:
    num_devices = mesh_config.get('num_devices') or jax.device_count()
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'config.mesh: at most one of {MESH_AXES} may be -1, got {sizes}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh: {num_devices} devices are not divisible by the fixed '
                       f'mesh sizes {dict(zip(MESH_AXES, sizes))}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh: {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices, but {num_devices} are available')
  if mesh_config.rules in ('dp', 'fsdp') and sizes[2] > 1:
    raise ValueError(f'config.mesh.tensor={sizes[2]} needs config.mesh.rules=fsdp_tp '
                     f'(preset {mesh_config.rules!r} does not use the tensor axis)')
  if mesh_config.num_slices > 1 and sizes[0] % mesh_config.num_slices:
    raise ValueError(f'config.mesh.data={sizes[0]} must be a multiple of '
                     f'num_slices={mesh_config.num_slices}')
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh with Auto axis types over `devices` (default: all)."""
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(mesh_config, len(devices))
  if mesh_config.num_slices > 1:
    slices = mesh_config.num_slices
    device_array = mesh_utils.create_hybrid_device_mesh(
        (shape[0] // slices, shape[1], shape[2]), (slices, 1, 1), devices)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def activate(mesh: Mesh, mesh_config: ml_collections.ConfigDict):
  """Context in which jitted model code sees the mesh and the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(mesh_config)):
    yield


def _dims(spec: PartitionSpec, ndim: int) -> list[list[str]]:
  """Mesh axes of each of `ndim` dimensions (a spec may be shorter than the shape)."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return [[] if a is None else [a] if isinstance(a, str) else list(a) for a in entries]


def fit_spec(shape: tuple[int, ...], spec: PartitionSpec,
             axis_sizes: dict[str, int]) -> PartitionSpec:
  """`spec` with every mesh axis that does not divide its dimension moved to the largest other
  dimension it divides (after that dimension's own axes), or dropped, which replicates the
  array along it, when it divides none."""
  dims, moved = _dims(spec, len(shape)), []
  for dim, axes in enumerate(dims):
    kept, size = [], 1
    for axis in axes:
      if shape[dim] % (size * axis_sizes[axis]):
        moved.append(axis)
      else:
        kept.append(axis)
        size *= axis_sizes[axis]
    dims[dim] = kept
  for axis in moved:
    fits = [d for d in range(len(shape))
            if shape[d] % (math.prod(axis_sizes[a] for a in dims[d]) * axis_sizes[axis]) == 0]
    if fits:
      dims[max(fits, key=lambda d: shape[d])].append(axis)
  return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
                         for axes in dims))


def _values(tree):
  """A boxed tree's values, unboxed without the boxes' logical sharding constraints (which
  would ask for the specs before `fit_spec`)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_specs(abstract_tree, axis_rules, axis_sizes: dict[str, int]):
  """Mesh PartitionSpecs (unboxed tree) of a boxed abstract parameter tree: the logical rules'
  specs, fitted to each parameter's shape (`fit_spec`)."""
  logical = nn.get_partition_spec(abstract_tree)
  specs = jax.tree.leaves(nn.logical_to_mesh(logical, axis_rules),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
  leaves, treedef = jax.tree.flatten(_values(abstract_tree))
  return treedef.unflatten([fit_spec(leaf.shape, spec, axis_sizes)
                            for leaf, spec in zip(leaves, specs)])


def logical_shardings(abstract_tree, mesh: Mesh, axis_rules):
  """NamedShardings (unboxed tree) for a tree of (possibly boxed) abstract parameters."""
  specs = param_specs(abstract_tree, axis_rules, dict(mesh.shape))
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, axis_rules, *args):
  """Runs `init_fn(*args)` under jit with its outputs born sharded; returns (params, shardings).

  `init_fn` returns a tree of `nn.LogicallyPartitioned` leaves; the result is unboxed.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, axis_rules)
    params = jax.jit(lambda *a: _values(init_fn(*a)), out_shardings=shardings)(*args)
  return params, shardings


def mesh_axis_sizes(mesh_shape: tuple[int, ...]) -> dict[str, int]:
  return dict(zip(MESH_AXES, mesh_shape))


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, axis_sizes: dict[str, int]):
  """Shape of one device's shard (rounded up) for a PartitionSpec over mesh axes."""
  return tuple(-(-size // math.prod(axis_sizes[a] for a in axes))
               for size, axes in zip(shape, _dims(spec, len(shape))))


def per_device_bytes(abstract_tree, axis_rules, mesh_shape: tuple[int, ...]) -> int:
  """Bytes one device holds for a boxed abstract tree under a mesh shape (no devices needed)."""
  sizes = mesh_axis_sizes(mesh_shape)
  specs = jax.tree.leaves(param_specs(abstract_tree, axis_rules, sizes),
                          is_leaf=lambda x: isinstance(x, PartitionSpec))
  return sum(
      math.prod(shard_shape(leaf.shape, spec, sizes)) * np.dtype(leaf.dtype).itemsize
      for leaf, spec in zip(jax.tree.leaves(_values(abstract_tree)), specs))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch-leading array: batch over `data` x `fsdp`."""
  return NamedSharding(mesh, PartitionSpec(BATCH))
