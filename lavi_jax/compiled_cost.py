"""What a compiled program executes, read from its optimised HLO with every loop counted: its
matmul FLOPs and its HBM traffic.

`Compiled.cost_analysis()` counts a `while` body once, so a scanned layer stack, a chunked loss
and accumulated micro-batches are undercounted by their trip counts; on TPU its `bytes accessed`
also counts every memory space, so a weight prefetched into VMEM (`copy-start` / `slice-start`
to a buffer whose layout says `S(1)`) is counted when it is read from HBM, written to VMEM and
read again from VMEM. This walks the optimised HLO module (`compiled.as_text()`, the per-device
program after SPMD partitioning) instead:

  cost(computation) = sum over its instructions + sum over the computations they call
                      (calls, async ops, conditionals: the costliest branch) of their cost,
                      with a while loop's body and condition counted trip-count times.

FLOPs (`count`, `matmul_flops`) are those of dots and convolutions, fusions included: a dot costs
2 x (output elements) x (contracted size); a convolution 2 x (output elements) x (kernel input
features) x (kernel window), as XLA's own cost analysis counts them. Elementwise work (softmax,
norms, the optimizer) and kernels (Pallas custom calls such as splash attention: they carry no
cost estimate) are not counted; `count` says how many kernel calls were left out.

HBM bytes (`hbm_bytes`) are the array bytes each top-level instruction (a fusion as a whole)
reads and writes in device memory, arrays whose layout names another memory space (`S(n)`)
left out: slices, gathers and in-place updates move their slice only, a fusion reads only the
slices its fused code takes of an operand, an asynchronous copy counts at its start. Tiles'
padding is not counted.

A loop's trip count is read from the loop (`counter < bound`, counter from a constant start by a
constant step: the form `lax.scan`, `fori_loop` and XLA's own loops take); a loop of another
form raises `UnknownTripCount` for FLOPs, and counts once for HBM bytes (a decode loop that stops
at end of sequence: its bytes are then one token's).
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$')
_ARRAY = re.compile(r'^\w+\[([\d,]*)\]')
_NAME = re.compile(r'%([\w.\-]+)')
_CALLED = re.compile(r'(calls|to_apply|body|condition|branch_computations|called_computations)='
                     r'(\{[^}]*\}|%[\w.\-]+)')


class UnknownTripCount(ValueError):
  """A while loop whose trip count cannot be read from its condition."""


class _Instruction:
  __slots__ = ('is_root', 'name', 'type', 'shape', 'op', 'inside', 'operands', 'attributes')

  def __init__(self, root: str | None, name: str, type_: str, op: str, rest: str):
    self.is_root, self.name, self.type, self.op = bool(root), name, type_, op
    array = _ARRAY.match(type_)
    self.shape = None if array is None else tuple(int(d) for d in array[1].split(',') if d)
    depth, end = 1, 0
    for end, char in enumerate(rest):
      depth += {'(': 1, ')': -1}.get(char, 0)
      if depth == 0:
        break
    self.inside = rest[:end]  # the operands (a constant's literal)
    self.operands = _NAME.findall(self.inside)
    self.attributes = rest[end + 1:]


def parse_module(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """HLO module text -> ({computation name: instructions}, entry computation name)."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header[1], [])
      if line.startswith('ENTRY'):
        entry = header[1]
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction and current is not None:
      current.append(_Instruction(*instruction.groups()))
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def _matmul_flops(instruction: _Instruction, shapes: dict[str, tuple[int, ...]]) -> float:
  if instruction.op == 'dot':
    contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', instruction.attributes)
    lhs = shapes[instruction.operands[0]]
    dims = [int(d) for d in contracting[1].split(',') if d] if contracting else []
    return 2.0 * math.prod(instruction.shape) * math.prod(lhs[d] for d in dims)
  return _convolution_flops(instruction, shapes)


def _convolution_flops(instruction: _Instruction, shapes: dict[str, tuple[int, ...]]) -> float:
  """2 x multiply-adds that touch real input: batched matmuls become convolutions whose batch
  dims are padded, dilated windows, so only the valid taps of each window count (as XLA's
  HloCostAnalysis counts them)."""
  attributes = instruction.attributes
  lhs_labels, kernel_labels, out_labels = re.search(
      r'dim_labels=([^_]+)_([^-]+)->([^,\s]+)', attributes).groups()
  lhs, kernel = shapes[instruction.operands[0]], shapes[instruction.operands[1]]
  groups = {key: int(value) for key, value in
            re.findall(r'(feature_group_count|batch_group_count)=(\d+)', attributes)}
  window = dict(re.findall(r'(\w+)=([\dx_]+)', (re.search(r'window=\{([^}]*)\}', attributes)
                                                   or [None, ''])[1]))
  spatial = sorted(c for c in lhs_labels if c.isdigit())  # window fields are in this order

  def per_dim(key: str, default: int) -> list[int]:
    return [int(v) for v in window[key].split('x')] if key in window else [default] * len(spatial)

  pads = ([tuple(int(p) for p in v.split('_')) for v in window['pad'].split('x')]
          if 'pad' in window else [(0, 0)] * len(spatial))
  taps = 1
  for k, stride, lhs_dilate, rhs_dilate, (pad_low, _) in zip(
      spatial, per_dim('stride', 1), per_dim('lhs_dilate', 1), per_dim('rhs_dilate', 1), pads):
    size_in = lhs[lhs_labels.index(k)]
    size_kernel = kernel[kernel_labels.index(k)]
    size_out = instruction.shape[out_labels.index(k)]
    position = (np.arange(size_out)[:, None] * stride + np.arange(size_kernel)[None] * rhs_dilate
                - pad_low)
    valid = (position >= 0) & (position % lhs_dilate == 0) & (position // lhs_dilate < size_in)
    taps *= int(valid.sum())
  multiply_adds = (lhs[lhs_labels.index('f')] // groups.get('feature_group_count', 1) *
                   kernel[kernel_labels.index('o')] *
                   lhs[lhs_labels.index('b')] // groups.get('batch_group_count', 1) * taps)
  return 2.0 * multiply_adds


def _trip_count(loop: _Instruction, condition: list[_Instruction], body: list[_Instruction],
                instructions: dict[str, _Instruction]) -> int:
  """Iterations of a `while`: the compiler's `known_trip_count` where it gives one (CPU, GPU),
  else read from a condition `counter < bound` (a constant), a body that adds a constant step to
  the counter (XLA's windowed einsums step by 2) and a constant initial value."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
  if known:
    return int(known[1])

  def source(name: str) -> _Instruction:
    instruction = instructions[name]
    while instruction.op in ('copy', 'bitcast', 'convert') and instruction.operands:
      instruction = instructions[instruction.operands[0]]
    return instruction

  def constant(instruction: _Instruction) -> int | None:
    literal = re.fullmatch(r'\s*(-?\d+)\s*', instruction.inside)
    return int(literal[1]) if instruction.op == 'constant' and literal else None

  def tuple_index(instruction: _Instruction) -> int | None:
    found = re.search(r'index=(\d+)', instruction.attributes)
    return int(found[1]) if instruction.op == 'get-tuple-element' and found else None

  fail = UnknownTripCount(f'{loop.name}: its trip count is not `counter < constant` with a '
                          f'constant start and step')
  root = lambda computation: next(i for i in computation if i.is_root)
  compare = source(root(condition).name)
  if compare.op != 'compare' or 'direction=LT' not in compare.attributes:
    raise fail
  counter, bound = (source(o) for o in compare.operands)
  index, bound = tuple_index(counter), constant(bound)
  result, init = root(body), source(loop.operands[0])
  if index is None or bound is None or result.op != 'tuple' or init.op != 'tuple':
    raise fail
  update, start = source(result.operands[index]), constant(source(init.operands[index]))
  if update.op != 'add' or start is None:
    raise fail
  steps = [constant(source(o)) for o in update.operands]
  previous = [tuple_index(source(o)) for o in update.operands]
  step = next((c for c, p in zip(steps, previous[::-1]) if c is not None and p == index), None)
  if not step or step < 0:
    raise fail
  return max(0, -(-(bound - start) // step))


class _Program:
  """An optimised HLO module: its computations by name, and its instructions and their users by
  instruction name (names are unique in a module)."""

  def __init__(self, hlo_text: str):
    self.computations, self.entry = parse_module(hlo_text)
    self.instructions = {i.name: i for body in self.computations.values() for i in body}
    self.users: dict[str, list[_Instruction]] = {}
    for i in self.instructions.values():
      for operand in i.operands:
        self.users.setdefault(operand, []).append(i)

  def called(self, instruction: _Instruction) -> dict[str, list[str]]:
    """The computations an instruction calls, by attribute (calls, body, to_apply, ...)."""
    return dict((key, _NAME.findall(value)) for key, value in _CALLED.findall(
        instruction.attributes))

  def fused(self, fusion: _Instruction) -> list[_Instruction]:
    return self.computations[self.called(fusion)['calls'][0]]


def _walk(hlo_text: str, cost, into_fusions: bool, unknown_trips_once: bool) -> np.ndarray:
  """Sum of cost(instruction, program) (a number or an array) over every instruction the program
  executes, loops times their trip counts; fusions' own computations only with `into_fusions`."""
  program = _Program(hlo_text)
  computations = program.computations

  @functools.lru_cache(maxsize=None)
  def walk(name: str) -> np.ndarray:
    total = 0
    for instruction in computations[name]:
      total = total + cost(instruction, program)
      called = program.called(instruction)
      if instruction.op == 'while':
        condition, body = called['condition'][0], called['body'][0]
        try:
          trips = _trip_count(instruction, computations[condition], computations[body],
                              program.instructions)
        except UnknownTripCount:
          if not unknown_trips_once:
            raise
          trips = 1
        total = total + trips * walk(body)
      elif 'branch_computations' in called:
        total = total + max((walk(b) for b in called['branch_computations']),
                            key=lambda c: np.asarray(c).flat[0])
      elif instruction.op == 'call':
        total = total + walk(called['to_apply'][0])
      elif instruction.op != 'fusion' or into_fusions:
        for key in ('calls', 'called_computations'):
          for c in called.get(key, ()):
            total = total + walk(c)
    return total

  return np.asarray(walk(program.entry), dtype=float)


def _flops_and_kernels(instruction: _Instruction, program: _Program) -> np.ndarray:
  shapes = {name: program.instructions[name].shape for name in instruction.operands}
  flops = (_matmul_flops(instruction, shapes) if instruction.op in ('dot', 'convolution')
           else 0.0)
  kernel = instruction.op == 'custom-call' and (
      'custom_call_target="tpu_custom_call"' in instruction.attributes)
  return np.array([flops, float(kernel)])


def count(hlo_text: str) -> tuple[float, int]:
  """(FLOPs of every dot and convolution the program executes, Pallas/Mosaic kernel calls it
  makes, whose work is not counted), per device, loops unrolled."""
  flops, kernels = _walk(hlo_text, _flops_and_kernels, into_fusions=True,
                         unknown_trips_once=False)
  return float(flops), int(kernels)


def matmul_flops(hlo_text: str) -> float:
  """FLOPs of every dot and convolution the program executes (per device), loops unrolled."""
  return count(hlo_text)[0]


_ARRAYS = re.compile(r'(\w+)\[([\d,]*)\](?:\{([^}]*)\})?')
_OTHER_MEMORY = re.compile(r'S\([1-9]\d*\)')  # a layout's memory space other than device memory
_BYTES = dict(pred=1, s4=0.5, u4=0.5, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4,
              s64=8, u64=8, f64=8, c64=8, c128=16)
# Instructions that move no data themselves (loops and calls: their computations are walked; an
# asynchronous operation counts at its start).
_NO_TRAFFIC = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
               'partition-id', 'replica-id', 'opt-barrier', 'add-dependency', 'while', 'call',
               'conditional', 'async-start', 'async-update'}
_SLICING = {'slice', 'dynamic-slice', 'gather'}


def _array_bytes(type_: str, device_memory_only: bool = True) -> float:
  """Bytes of the arrays of an HLO type (a tuple's summed), by default only those in device
  memory (HBM)."""
  total = 0.0
  for dtype, dims, layout in _ARRAYS.findall(type_):
    size = _BYTES.get(dtype, 1 if dtype.startswith('f8') else 0)
    if not (device_memory_only and _OTHER_MEMORY.search(layout)):
      total += size * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _fused_reads(value: _Instruction, program: _Program, stored: float) -> float:
  """Device-memory bytes fused code reads of `value` (a fusion's parameter, `stored` bytes in
  device memory): the slices it takes where it is only sliced (through bitcasts and nested
  fusions), nothing where it is the buffer a fused in-place update writes into; all of it
  where it flows out of a fused computation."""
  if value.is_root:
    return stored
  total = 0.0
  for user in program.users.get(value.name, []):
    if user.op == 'bitcast':
      total += _fused_reads(user, program, stored)
    elif user.op in _SLICING and user.operands[0] == value.name:
      total += _array_bytes(user.type, device_memory_only=False)
    elif user.op == 'dynamic-update-slice' and user.is_root and user.operands[0] == value.name:
      continue
    elif user.op == 'fusion':
      parameters = {int(p.inside): p for p in program.fused(user) if p.op == 'parameter'}
      total += sum(_fused_reads(parameters[index], program, stored)
                   for index, operand in enumerate(user.operands) if operand == value.name)
    else:
      return stored
  return min(total, stored)


def _device_memory_traffic(instruction: _Instruction, program: _Program) -> float:
  op = instruction.op
  if op in _NO_TRAFFIC or op.endswith('-done') or (op == 'custom-call' and
                                                     not instruction.operands):
    return 0.0
  operands = [program.instructions[o] for o in instruction.operands]
  read = sum(_array_bytes(o.type) for o in operands)
  written = _array_bytes(instruction.type)
  if op in _SLICING:
    return (_array_bytes(instruction.type, False) if _array_bytes(operands[0].type) else 0) + written
  if op == 'dynamic-update-slice':
    update = _array_bytes(operands[1].type, False)
    return _array_bytes(operands[1].type) + (update if written else 0)
  if op == 'slice-start':  # (operand), slice, context: reads the slice
    sliced = _array_bytes(instruction.type, False) - _array_bytes(operands[0].type, False)
    return min(read, sliced) + max(0.0, written - read)
  if op.endswith('-start'):  # its result repeats the operands beside what it writes
    return read + max(0.0, written - read)
  if op == 'fusion':
    fused = program.fused(instruction)
    parameters = {int(p.inside): p for p in fused if p.op == 'parameter'}
    root = next(i for i in fused if i.is_root)
    if root.op == 'dynamic-update-slice' and written:
      written = _array_bytes(program.instructions[root.operands[1]].type, False)
    return written + sum(_fused_reads(parameters[index], program, _array_bytes(operand.type))
                         for index, operand in enumerate(operands) if _array_bytes(operand.type))
  return read + written


def hbm_bytes(hlo_text: str) -> float:
  """Bytes the program reads and writes in device memory (per device), loops times their trip
  counts (a loop of unknown length once)."""
  return float(_walk(hlo_text, _device_memory_traffic, into_fusions=False,
                     unknown_trips_once=True))
