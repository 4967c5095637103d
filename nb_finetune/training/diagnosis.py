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
