"""LaVi's Hugging Face config (`model_type: lavi`), written by `lavi_jax.convert.to_torch`.

`text_config` is a Qwen2 or LLaMA config, `vision_config` a SigLIP vision config and
`lavi_config` the LaVi model config the export was made from (ViLN settings, projector width,
video pooling, ...), as a dict.
"""

from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, SiglipVisionConfig


class LaViConfig(PretrainedConfig):
  model_type = 'lavi'
  sub_configs = {'text_config': AutoConfig, 'vision_config': SiglipVisionConfig}

  def __init__(self, text_config=None, vision_config=None, image_token_id: int = 151646,
               video_token_id: int = 151647, vision_feature_layer: int | list[int] = -2,
               lavi_config: dict | None = None, tie_word_embeddings: bool = True, **kwargs):
    text_config = text_config if text_config is not None else {'model_type': 'qwen2'}
    if isinstance(text_config, dict):
      text_config = CONFIG_MAPPING[text_config['model_type']](**text_config)
    if not isinstance(vision_config, SiglipVisionConfig):
      vision_config = SiglipVisionConfig(**(vision_config or {}))
    self.text_config, self.vision_config = text_config, vision_config
    self.image_token_id, self.video_token_id = image_token_id, video_token_id
    self.vision_feature_layer = vision_feature_layer
    self.lavi_config = lavi_config or {}
    super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
