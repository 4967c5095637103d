"""A plain-words reading of the training curves."""
from __future__ import annotations

import numpy as np
import pandas as pd


def diagnose(history: pd.DataFrame) -> str:
    """A plain-words reading of the curves so far: over-fitting, under-fitting or learning.

    Over-fitting: the last two validations rose above the best one while training loss kept
    falling. Under-fitting: after 10 logged steps and 3 validations, training loss is still
    above 80% of where it started and validation loss has not improved by 5%."""
    train = history["train_loss"].dropna() if len(history) else pd.Series(dtype=float)
    val = history.dropna(subset=["val_loss"]) if len(history) else history
    preference = preference_failure(history)
    if preference:
        return preference
    if len(train) < 3 and len(val) < 2:
        return "too early to tell: waiting for more steps"
    first = float(train.iloc[0]) if len(train) else float("nan")
    last = float(train.iloc[-1]) if len(train) else float("nan")
    if len(val) >= 3:
        losses, steps = val["val_loss"].to_numpy(), val["step"].to_numpy()
        best = int(np.argmin(losses))
        tail = train[history.loc[train.index, "step"] >= steps[best]]
        rising = best <= len(losses) - 3 and losses[-1] > losses[best] * 1.02 and losses[-1] >= losses[-2]
        if rising and len(tail) >= 2 and tail.iloc[-1] < tail.iloc[0]:
            return (f"over-fitting: validation loss is up from {losses[best]:.3f} at step {steps[best]} to "
                    f"{losses[-1]:.3f} while training loss keeps falling; stop here, train fewer epochs, use "
                    "early stopping (train.early_stopping_patience), more data or a smaller LoRA rank")
    if len(train) >= 10 and len(val) >= 3:
        val_gain = 1 - val["val_loss"].iloc[-1] / val["val_loss"].iloc[0]
        if last > 0.8 * first and val_gain < 0.05:
            return (f"under-fitting: training loss only went from {first:.3f} to {last:.3f} and validation loss "
                    "is flat; raise the learning rate, train longer or use a larger LoRA rank")
    if len(train) >= 2:
        text = f"learning: training loss {first:.3f} -> {last:.3f}"
        if len(val) >= 2:
            text += f", validation loss {val['val_loss'].iloc[0]:.3f} -> {val['val_loss'].iloc[-1]:.3f}"
        return text
    return "too early to tell: waiting for more steps"


def preference_failure(history: pd.DataFrame, window: int = 3) -> str:
    """DPO's two failure modes, read from the rewards a preference run logs (training.preference):
    - the margin grows while both rewards fall: the model lowers both answers, the rejected one
      faster, and moves probability to text that is neither;
    - the chosen answers' log-probability collapses: it fell far below where it started.
    Each over the mean of the first and of the last `window` logged steps. '' when neither."""
    if "reward_margin" not in history or history["reward_margin"].notna().sum() < 2 * window:
        return ""
    logged = history.dropna(subset=["reward_margin"])
    head, tail = logged.head(window).mean(numeric_only=True), logged.tail(window).mean(numeric_only=True)
    if tail["reward_margin"] > head["reward_margin"] and tail["reward_chosen"] < 0 and tail["reward_rejected"] < 0 \
            and tail["reward_chosen"] < head["reward_chosen"]:
        return (f"preference: the margin grew ({head['reward_margin']:.3f} -> {tail['reward_margin']:.3f}) while "
                f"both rewards fell (chosen {tail['reward_chosen']:.3f}, rejected {tail['reward_rejected']:.3f}): "
                "the model makes both answers less likely; raise train.beta, lower the learning rate, or try "
                "train.method=orpo, whose loss keeps the chosen answers likely")
    drop = head["logp_chosen"] - tail["logp_chosen"]
    if drop > max(10.0, 0.5 * abs(head["logp_chosen"])):
        return (f"preference: the chosen answers' log-probability collapsed ({head['logp_chosen']:.1f} -> "
                f"{tail['logp_chosen']:.1f}); raise train.beta, lower the learning rate, or use train.method=orpo")
    return ""
