"""FLOPs: XLA's cost analysis of the compiled 7B programs (bench) agrees with the analytic count
used for MFU (train/flops.py), part by part, for LaVi and concat, image and video."""

import pytest

from lavi_jax import bench
from lavi_jax import config as lavi_config
from lavi_jax.train import flops


@pytest.mark.parametrize('fusion', ['viln', 'concat'])
@pytest.mark.parametrize('frames,video', [(10, False), (8, True)])
def test_compiled_flops_match_the_analytic_count(fusion, frames, video):
  model = lavi_config.load_config_file('configs/7b.py').model
  model.fusion = fusion
  compiled = bench.forward_breakdown(model, frames, video)
  analytic = flops.forward_flops(model, 1, bench.TEXT_TOKENS,
                                 image_frames=0 if video else frames,
                                 video_frames=frames if video else 0)
  assert compiled.vision == pytest.approx(analytic.vision, rel=0.03)
  assert compiled.projector_and_conditioners == pytest.approx(
      analytic.projector + analytic.conditioners, rel=0.05)
  # The analytic count puts the LM head at every position; the compiled concat model only at
  # the text positions.
  assert compiled.llm == pytest.approx(analytic.llm, rel=0.08)
