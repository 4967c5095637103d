"""nb_finetune: notebook panels and a headless engine for LoRA/QLoRA fine-tuning.

Importing it has no side effects, and it imports torch only when `Session` or `run` is first
used, so the config classes load in a fraction of a second."""
from .config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig, load_preset
from .errors import ConfigError, UserError

__all__ = ["ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "RunConfig", "Session", "TrainConfig",
           "UserError", "load_preset", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Session", "run"):
        from .quiet import loading_quietly
        with loading_quietly():  # pipeline imports peft, and with it bitsandbytes, which logs as it loads
            from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_ipython_extension(shell) -> None:
    """`%load_ext nb_finetune`: the `%finetune` and `%%finetune_config` magics."""
    from .magics import load
    load(shell)


def unload_ipython_extension(shell) -> None:
    from .magics import unload
    unload(shell)
