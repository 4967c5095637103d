"""Evaluation: scoring (sequence log-probabilities, label scores), the evaluation of the tuned
model against the base model and the majority class, and one cache of the base's results."""
from .base_cache import BaseResults, as_base
from .chat import Sampling, stream_reply
from .evaluate import EvalResult, EvalTarget, compare_prompt, evaluate, label_candidates
from .general import general_loss
from .preference import evaluate_pairs

__all__ = ["BaseResults", "EvalResult", "EvalTarget", "Sampling", "as_base", "compare_prompt", "evaluate",
           "evaluate_pairs", "general_loss", "label_candidates", "stream_reply"]
