"""Peak host memory of `convert.to_torch` on a ~2B-parameter random checkpoint.

    python -m lavi_jax.convert.bench_export [--dir TMP] [--max-shard-size 5GB] [--keep]

Writes a random LaVi checkpoint (a `convert.from_hf` folder, bf16 parameters: Qwen2-1.5B-sized
LLM, SigLIP-so400m tower, attention conditioners; ~4 GB on disk) into a temporary folder, runs
the export in a subprocess and prints its peak RSS next to the checkpoint's size, and the RSS
of a process that only imports the converter (the floor).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

_BUILD = '''
import sys
import ml_dtypes, numpy as np
from flax import traverse_util
from lavi_jax.convert import bench_export, from_hf
from lavi_jax.models import abstract_params
model = bench_export.model_config()
abstract = abstract_params(model)
rng = np.random.default_rng(0)
flat = {k: (0.02 * rng.standard_normal(v.shape, np.float32)).astype(ml_dtypes.bfloat16)
        for k, v in traverse_util.flatten_dict(abstract).items()}
from_hf.save_converted(sys.argv[1], model, traverse_util.unflatten_dict(flat))
'''


def model_config():
  """~2.1B parameters: a Qwen2-1.5B-sized LLM, SigLIP-so400m, attention conditioners."""
  from lavi_jax import config as lavi_config
  model = lavi_config.base_model_config()
  model.param_dtype = 'bfloat16'
  model.llm.update(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                   num_kv_heads=2)
  return model


def run_measured(args: list[str]) -> tuple[int, float]:
  """Runs `python args...`; returns (peak RSS in bytes, seconds). Fails if the command fails."""
  start = time.time()
  process = subprocess.Popen([sys.executable] + args)
  _, status, usage = os.wait4(process.pid, 0)
  if os.waitstatus_to_exitcode(status) != 0:
    raise RuntimeError(f'{args} failed with status {status}')
  return usage.ru_maxrss * 1024, time.time() - start


def folder_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dir', help='where to write (default: a temporary folder, removed after)')
  parser.add_argument('--max-shard-size', default='5GB')
  parser.add_argument('--keep', action='store_true', help='keep the folder')
  args = parser.parse_args(argv)
  root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix='lavi_bench_export_'))
  checkpoint, out = root / 'checkpoint', root / 'torch'
  try:
    if not checkpoint.exists():
      _, seconds = run_measured(['-c', _BUILD, str(checkpoint)])
      print(f'built the random checkpoint in {seconds:.0f} s')
    shutil.rmtree(out, ignore_errors=True)
    floor, _ = run_measured(['-c', 'import lavi_jax.convert.to_torch'])
    peak, seconds = run_measured(['-m', 'lavi_jax.convert.to_torch', '--checkpoint',
                                  str(checkpoint), '--out', str(out), '--max-shard-size',
                                  args.max_shard_size])
    from lavi_jax.convert import hf
    exported = hf.Checkpoint(out)
    params = sum(math.prod(exported.shape(name)) for name in exported.names())
    shards = len(list(out.glob('*.safetensors')))
    gib = lambda n: f'{n / 2 ** 30:.2f} GiB'
    print(f'parameters   {params / 1e9:.3f}B')
    print(f'checkpoint   {gib(folder_bytes(checkpoint))} on disk (Orbax, bf16)')
    print(f'export       {gib(folder_bytes(out))} in {shards} file(s) '
          f'(--max-shard-size {args.max_shard_size}), {seconds:.0f} s')
    print(f'peak RSS     {gib(peak)} (a process that only imports the converter: {gib(floor)})')
  finally:
    if not args.keep:
      shutil.rmtree(root if not args.dir else out, ignore_errors=True)
    else:
      print(f'kept {root}')


if __name__ == '__main__':
  main()
