"""Training: policy (precision, optimizer, accumulation), the Trainer subclass and its event
bridge, progress with ETA, and a plain-words diagnosis of the curves."""
from .diagnosis import diagnose
from .policy import accumulation
from .progress import Callback, ConsoleProgress
from .train import TrainResult, TrainTarget, Watch, train
from .trainer import HISTORY_COLUMNS

__all__ = ["HISTORY_COLUMNS", "Callback", "ConsoleProgress", "TrainResult", "TrainTarget", "Watch", "accumulation",
           "diagnose", "train"]
