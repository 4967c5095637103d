"""nb_finetune: notebook panels and a headless engine for LoRA/QLoRA fine-tuning."""
from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig, load_preset
from .errors import ConfigError, UserError
from .memory import huge_pages_for_tensors

# Before anything allocates a tensor: torch decides once, at its first CPU allocation.
huge_pages_for_tensors()

__all__ = ["DataConfig", "EvalConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_preset",
           "ConfigError", "UserError"]
__version__ = "0.1.0"


def load_ipython_extension(shell) -> None:
    """`%load_ext nb_finetune`: the `%finetune` and `%%finetune_config` magics."""
    from .magics import load
    load(shell)


def unload_ipython_extension(shell) -> None:
    from .magics import unload
    unload(shell)
