"""Where generation runs: a device mesh, its sharding rules and the serving dtype.

A `Placement` says how a model is laid out for generation:
- parameters are restored (or cast) to the serving `dtype` and split over the mesh by the
  logical-axis rules of `lavi_jax.sharding` (`fsdp`: along embedding axes; `fsdp_tp`: also
  heads, MLP and vocabulary over `tensor`);
- a batch's rows are split over `data` x `fsdp`; the KV cache (L, B, S, K, Dh) over the batch
  axes and, under `fsdp_tp`, its KV heads over `tensor`; the visual memory follows its batch
  and head axes.

The default placement is one device in the checkpoint's dtypes, as generation ran before
meshes. `Placement.from_flags('1,1,4', 'bfloat16')` is what the command lines build.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math

import jax
import ml_collections
from jax.sharding import Mesh

from lavi_jax import config as lavi_config
from lavi_jax import sharding
from lavi_jax.models import abstract_params, init_params
from lavi_jax.models.layers import dtype_of


@dataclasses.dataclass(frozen=True)
class Placement:
  """mesh: a `(data, fsdp, tensor)` mesh (`sharding.make_mesh`); rules: its preset name;
  dtype: parameters and computation in this dtype (None: the checkpoint's model config)."""
  mesh: Mesh
  rules: str = 'fsdp'
  dtype: str | None = None

  @classmethod
  def single_device(cls, dtype: str | None = None) -> Placement:
    return cls.from_flags('1,1,1', dtype)

  @classmethod
  def on(cls, mesh: Mesh, dtype: str | None = None) -> Placement:
    """A placement on a `(data, fsdp, tensor)` mesh: rules `fsdp_tp` when it has a tensor axis
    of more than one device, else `fsdp`."""
    return cls(mesh, 'fsdp_tp' if mesh.shape['tensor'] > 1 else 'fsdp', dtype)

  @classmethod
  def from_flags(cls, mesh: str, dtype: str | None = None, devices=None) -> Placement:
    """mesh: 'DATA,FSDP,TENSOR' sizes (one may be -1: the rest of `devices`, default all; else
    the first DATA x FSDP x TENSOR devices); the rules are `fsdp_tp` when TENSOR > 1, else
    `fsdp`."""
    sizes = mesh_sizes(mesh)
    if dtype is not None and dtype not in lavi_config.DTYPES:
      raise ValueError(f'dtype {dtype!r} is not one of {lavi_config.DTYPES}')
    devices = jax.devices() if devices is None else devices
    if -1 not in sizes:
      devices = devices[:math.prod(sizes)]
    devices = jax.devices() if devices is None else devices
    if -1 not in sizes:
      devices = devices[:math.prod(sizes)]
    mesh_config = ml_collections.ConfigDict(dict(
        zip(sharding.MESH_AXES, sizes), rules='fsdp_tp', num_slices=1))
    return cls.on(sharding.make_mesh(mesh_config, devices), dtype)

  @property
  def axis_rules(self):
    return sharding.RULE_PRESETS[self.rules]

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in sharding.BATCH)

  def rows(self, n: int) -> int:
    """The batch size that holds `n` rows: n rounded up to a multiple of the batch shards."""
    return -(-n // self.batch_shards) * self.batch_shards

  def model(self, model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model config generation runs: `model` with dtype and param_dtype set to `dtype`."""
    model = ml_collections.ConfigDict(model.to_dict())
    if self.dtype is not None:
      model.dtype = model.param_dtype = self.dtype
    self.check(model)
    return model

  def check(self, model: ml_collections.ConfigDict):
    """Raises ValueError when the tensor axis does not divide an axis it splits."""
    tensor = self.mesh.shape['tensor']
    if tensor == 1:
      return
    llm, vision = model.llm, model.vision
    split = {'llm.num_heads': llm.num_heads, 'llm.num_kv_heads': llm.num_kv_heads,
             'llm.intermediate_size': llm.intermediate_size, 'vision.num_heads': vision.num_heads,
             'vision.intermediate_size': vision.intermediate_size}
    bad = [f'{k}={v}' for k, v in split.items() if v % tensor]
    if bad:
      raise ValueError(f'a tensor axis of {tensor} devices must divide {", ".join(bad)}; '
                       'use fewer tensor devices (or more fsdp/data ones)')

  def param_shardings(self, model: ml_collections.ConfigDict):
    """NamedShardings of `model`'s parameters (unboxed tree) on the mesh."""
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return sharding.logical_shardings(boxed, self.mesh, self.axis_rules)

  def abstract_params(self, model: ml_collections.ConfigDict):
    """ShapeDtypeStructs (serving dtype, mesh shardings) to restore a checkpoint onto.
    `model`: the serving model config (`self.model(...)`)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_params(model), self.param_shardings(model))

  def place(self, model: ml_collections.ConfigDict, params):
    """Parameters already in memory (host or devices, any sharding) in the serving model's
    `param_dtype`, laid out on the mesh; those already so are kept as they are. `model`: the
    serving model config (`self.model(...)`)."""
    dtype = dtype_of(model.param_dtype)
    leaves, treedef = jax.tree.flatten(params)
    targets = jax.tree.leaves(self.param_shardings(model))
    placed = lambda x, s: (isinstance(x, jax.Array) and x.dtype == dtype
                           and x.sharding.is_equivalent_to(s, x.ndim))
    moving = [i for i, (x, s) in enumerate(zip(leaves, targets)) if not placed(x, s)]
    if moving:
      cast = jax.jit(lambda xs: [x.astype(dtype) for x in xs],
                     out_shardings=[targets[i] for i in moving])
      for i, x in zip(moving, cast([leaves[i] for i in moving])):
        leaves[i] = x
    return treedef.unflatten(leaves)

  @contextlib.contextmanager
  def activate(self):
    """Context in which the model's logical sharding constraints refer to this mesh."""
    mesh_config = ml_collections.ConfigDict(dict(rules=self.rules))
    with sharding.activate(self.mesh, mesh_config):
      yield


def mesh_sizes(text: str) -> list[int]:
  """'DATA,FSDP,TENSOR' -> [data, fsdp, tensor]; ValueError when it is not three integers."""
  try:
    sizes = [int(s) for s in text.split(',')]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ValueError(f'mesh {text!r}: give three sizes DATA,FSDP,TENSOR, e.g. 1,1,4')
  return sizes


def _mesh_flag(text: str) -> str:
  try:
    mesh_sizes(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return text


def add_flags(parser: argparse.ArgumentParser):
  """--mesh and --dtype, the placement flags of every command that generates
  (`Generator.load(path, mesh=args.mesh, dtype=args.dtype)`)."""
  parser.add_argument('--mesh', type=_mesh_flag,
                      help='devices to split the model over, as DATA,FSDP,TENSOR sizes (e.g. '
                      '1,1,4: tensor parallel over 4 devices; one size may be -1: the rest of '
                      'the devices). Default: one device')
  parser.add_argument('--dtype', choices=lavi_config.DTYPES,
                      help='parameters and computation in this dtype (default: the checkpoint\'s)')
