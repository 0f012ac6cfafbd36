"""Matmul FLOPs of a compiled program, read from its optimised HLO with every loop counted.

`Compiled.cost_analysis()` counts a `while` body once, so a scanned layer stack, a chunked loss
and accumulated micro-batches are undercounted by their trip counts. This walks the optimised
HLO module (`compiled.as_text()`, the per-device program after SPMD partitioning) instead:

  F(computation) = sum of its dots and convolutions + sum over the computations it calls
                   (fusions, calls, async ops, conditionals: the costliest branch) of their F,
                   with a while loop's body and condition counted trip-count times.

A dot costs 2 x (output elements) x (contracted size); a convolution 2 x (output elements) x
(kernel input features) x (kernel window), as XLA's own cost analysis counts them. A loop's trip
count is read from the loop (`counter < bound`, counter from a constant start by a constant step:
the form `lax.scan`, `fori_loop` and XLA's own loops take); a loop of another form raises
`UnknownTripCount`. Elementwise work
(softmax, norms, the optimizer) and kernels (Pallas custom calls such as splash attention: they
carry no cost estimate) are not counted; `count` says how many kernel calls were left out.
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
  __slots__ = ('is_root', 'name', 'shape', 'op', 'inside', 'operands', 'attributes')

  def __init__(self, root: str | None, name: str, type_: str, op: str, rest: str):
    self.is_root, self.name, self.op = bool(root), name, op
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


def count(hlo_text: str) -> tuple[float, int]:
  """(FLOPs of every dot and convolution the program executes, Pallas/Mosaic kernel calls it
  makes, whose work is not counted), per device, loops unrolled."""
  computations, entry = parse_module(hlo_text)
  instructions = {i.name: i for body in computations.values() for i in body}
  shapes = {name: i.shape for name, i in instructions.items()}

  @functools.lru_cache(maxsize=None)
  def walk(name: str) -> np.ndarray:
    total = np.zeros(2)  # (FLOPs, kernel calls)
    for instruction in computations[name]:
      if instruction.op in ('dot', 'convolution'):
        total[0] += _matmul_flops(instruction, shapes)
      if instruction.op == 'custom-call' and 'custom_call_target="tpu_custom_call"' in (
          instruction.attributes):
        total[1] += 1
      called = dict((key, _NAME.findall(value))
                    for key, value in _CALLED.findall(instruction.attributes))
      if instruction.op == 'while':
        condition, body = called['condition'][0], called['body'][0]
        trips = _trip_count(instruction, computations[condition], computations[body], instructions)
        total += trips * walk(body)
      elif 'branch_computations' in called:
        total += max((walk(b) for b in called['branch_computations']), key=lambda c: c[0])
      else:
        total += sum((walk(c) for key in ('calls', 'called_computations')
                      for c in called.get(key, ())), np.zeros(2))
    return total

  flops, kernels = walk(entry)
  return float(flops), int(kernels)


def matmul_flops(hlo_text: str) -> float:
  """FLOPs of every dot and convolution the program executes (per device), loops unrolled."""
  return count(hlo_text)[0]
