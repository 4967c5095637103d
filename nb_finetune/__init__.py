"""nb_finetune: notebook panels and a headless engine for LoRA/QLoRA fine-tuning."""
from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig, load_preset
from .errors import ConfigError, UserError

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_preset",
           "ConfigError", "UserError"]
__version__ = "0.1.0"
