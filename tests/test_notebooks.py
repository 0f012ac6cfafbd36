"""Every notebook runs top to bottom (nbclient, CPU) with small settings.

The cell tagged `parameters` is replaced by the small settings below (papermill's convention);
the install cell does nothing outside Colab.
"""

import os
import pathlib

import pytest

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'


# notebook: small settings
CASES = {
    'quickstart.ipynb': dict(STEPS=6, BATCH_SIZE=8, EVAL_SIZE=16),
    'finetune.ipynb': dict(STEPS=4, BATCH_SIZE=4, LLM_DIR='', VISION_DIR='',
                           CONFIG='configs/tiny.py'),
    'convert_to_pytorch.ipynb': dict(STEPS=2),
}


def _with_parameters(nb, values: dict):
  (cell,) = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  defined = {line.split('=')[0].strip() for line in cell.source.splitlines()
             if '=' in line and not line.startswith('#')}
  assert set(values) <= defined, f'{set(values) - defined} not in the parameters cell'
  cell.source = '\n'.join(f'{k} = {v!r}' for k, v in values.items())
  return nb


def test_every_notebook_is_tested():
  assert sorted(p.name for p in NOTEBOOKS.glob('*.ipynb')) == sorted(CASES)


@pytest.mark.parametrize('name', sorted(CASES))
def test_notebook_runs(name, tmp_path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  install = nb.cells[1].source
  assert "'google.colab' in sys.modules" in install and 'pip install' in install
  nb = _with_parameters(nb, dict(CASES[name], WORKDIR=str(tmp_path / 'workdir')))
  # One CPU device for the kernel: faster to compile than the suite's 8 fake ones.
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', MPLBACKEND='Agg')
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOKS)}})
  client.execute(env=env)  # raises CellExecutionError naming the failing cell
