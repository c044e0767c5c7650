from ortho_run.config import ModelConfig
from ortho_run.registry import Registry

#: name -> builder(cfg, in_channels, image_size) -> (module returning [B, D], D); every module
#: of ortho_run.models that registers a model is found by discovery
MODELS = Registry("model", group="model", package="ortho_run.models", base_schema=ModelConfig)
