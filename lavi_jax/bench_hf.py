"""The measured requests answered by Hugging Face `LlavaOnevisionForConditionalGeneration`
(PyTorch on the CPU, float32, random weights) at the measured model's sizes: the tool a user
would otherwise pick.

The Qwen2 LLM and SigLIP tower have the measured model's sizes (features from layer -2, all
patches, LLaVA-OneVision's two-layer GELU projector to the LLM width). LLaVA-OneVision always
encodes a single image as AnyRes crops: with the smallest grid (`image_grid_pinpoints` = one
crop of the image size) that is the base crop plus one grid crop, each (S / patch)^2 tokens,
plus one `image_newline` token per row of the grid crop. Timed like the JAX runs
(`bench_latency.timed`): greedy `generate` with min_new_tokens = max_new_tokens, the first token
marked by a streamer. torch and transformers are imported only here, in the measuring process.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from lavi_jax.bench_latency import (BATCHES, LATENCIES, latency_row, peak_rss_bytes, request,
                                    timed)


def hf_config(model: ml_collections.ConfigDict):
  """A LlavaOnevisionConfig with the LaVi model's LLM and vision sizes."""
  import transformers
  llm, vision = model.llm, model.vision
  layers = list(vision.feature_layers)
  text = transformers.Qwen2Config(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps,
      tie_word_embeddings=llm.tie_word_embeddings)
  siglip = transformers.SiglipVisionConfig(
      hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
      num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
      image_size=vision.image_size, patch_size=vision.patch_size,
      layer_norm_eps=vision.layer_norm_eps)
  return transformers.LlavaOnevisionConfig(
      text_config=text.to_dict(),
      vision_config=dict(siglip.to_dict(), model_type='siglip_vision_model'),
      image_token_id=model.image_token_id, video_token_id=model.video_token_id,
      vision_feature_layer=layers[0] if len(layers) == 1 else layers,
      vision_feature_select_strategy='full',
      image_grid_pinpoints=[[vision.image_size, vision.image_size]],
      tie_word_embeddings=llm.tie_word_embeddings)


def visual_tokens(model: ml_collections.ConfigDict) -> int:
  """Tokens LLaVA-OneVision makes of one S x S image: base crop, grid crop, a newline per row."""
  side = model.vision.image_size // model.vision.patch_size
  return 2 * side * side + side


def measure_hf(model_dict: dict, run: dict[str, int]) -> dict[str, Any]:
  """Latencies and peak RSS of the Hugging Face model (meant for a fresh process)."""
  import torch
  import transformers

  class MarkTokens(transformers.generation.streamers.BaseStreamer):
    """Calls on_tokens() for every generated token (`put` sees the prompt first)."""

    def __init__(self, on_tokens):
      self.on_tokens, self.prompt_seen = on_tokens, False

    def put(self, value):
      if self.prompt_seen:
        self.on_tokens()
      self.prompt_seen = True

    def end(self):
      pass

  model = ml_collections.ConfigDict(model_dict)
  torch.manual_seed(0)
  hf = transformers.LlavaOnevisionForConditionalGeneration(hf_config(model)).eval()
  n_visual = visual_tokens(model)
  report = dict(model='LlavaOnevisionForConditionalGeneration', torch=torch.__version__,
                transformers=transformers.__version__, threads=torch.get_num_threads(),
                crops_per_image=2, visual_tokens_per_image=n_visual,
                baseline_rss_bytes=peak_rss_bytes())
  for batch in BATCHES:
    ids, _, pixels = request(model, batch, run['text_tokens'])
    text = [np.concatenate([row[:1], [model.image_token_id] * n_visual, row[2:]]) for row in ids]
    crops = np.repeat(pixels.transpose(0, 1, 4, 2, 3), 2, axis=1)  # (B, 2, 3, S, S)
    inputs = dict(input_ids=torch.tensor(np.stack(text), dtype=torch.long),
                  pixel_values=torch.tensor(crops),
                  image_sizes=torch.tensor([[model.vision.image_size] * 2] * batch))
    inputs['attention_mask'] = torch.ones_like(inputs['input_ids'])

    def generate(new_tokens):
      def run_once(on_tokens):
        with torch.inference_mode():
          return hf.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, streamer=MarkTokens(on_tokens))
      return run_once

    short, long = (timed(generate(run[f'{n}_new_tokens']), run['repeats'])
                   for n in ('short', 'long'))
    report[f'batch_{batch}'] = latency_row(short, long, run['long_new_tokens'])
  report['peak_rss_bytes'] = peak_rss_bytes()
  return report


def speedups(hf: dict[str, Any], jax_rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Hugging Face time / JAX time per latency, for LaVi ('viln') and concat."""
  return {fusion: {f'batch_{b}': {k: hf[f'batch_{b}'][k] / row[f'batch_{b}'][k]
                                  for k in LATENCIES}
                   for b in BATCHES}
          for fusion, row in jax_rows.items()}
