"""A plain-words reading of the training curves."""
from __future__ import annotations

import numpy as np
import pandas as pd

# The training loss is read as means over windows this many steps long (or a third of the run,
# where shorter). Rows grouped by length make each step's loss follow its rows' lengths; a
# mean over such a window holds steps of every length, so it follows the model.
WINDOW_STEPS = 50
# transformers' length groups are at most 50 steps: every window this long holds a group's
# short rows and long rows alike, so a sawtooth of lengths never stays high for a whole window.
DIVERGING_RISE = 1.25


def loss_windows(train: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """The logged training losses of the first and the last window (`WINDOW_STEPS` steps, or a
    third of the steps logged where the run is shorter; one log at least)."""
    steps = train["step"].to_numpy()
    span = min(WINDOW_STEPS, (steps[-1] - steps[0]) / 3)
    first = train["train_loss"][steps <= steps[0] + span]
    last = train["train_loss"][steps >= steps[-1] - span]
    return first, last


def diverging(train: pd.DataFrame) -> str:
    """The diagnosis where every loss of the last full window stays well above the first window's
    mean; a run shorter than two full windows cannot tell a divergence from a length sawtooth."""
    steps = train["step"].to_numpy()
    if len(train) < 3 or steps[-1] - steps[0] < 2 * WINDOW_STEPS:
        return ""
    first, last = loss_windows(train)
    if last.min() <= DIVERGING_RISE * first.mean():
        return ""
    return (f"diverging: training loss is up from {first.mean():.3f} (mean of the first {WINDOW_STEPS} steps) to "
            f"{last.min():.3f} or more over the last {WINDOW_STEPS}; lower train.learning_rate (a tenth of it), "
            "and check the data")


def over_fitting(train: pd.DataFrame, val: pd.DataFrame) -> str:
    """The diagnosis where the last two validations rose above the best one while training loss
    kept falling (its mean over the second half of the steps since the best below the first half's)."""
    losses, steps = val["val_loss"].to_numpy(), val["step"].to_numpy()
    best = int(np.argmin(losses))
    tail = train["train_loss"][train["step"].to_numpy() >= steps[best]].to_numpy()
    rising = best <= len(losses) - 3 and losses[-1] > losses[best] * 1.02 and losses[-1] >= losses[-2]
    half = len(tail) // 2
    if rising and len(tail) >= 2 and tail[half:].mean() < tail[:half].mean():
        return (f"over-fitting: validation loss is up from {losses[best]:.3f} at step {steps[best]} to "
                f"{losses[-1]:.3f} while training loss keeps falling; stop here, train fewer epochs, use "
                "early stopping (train.early_stopping_patience), more data or a smaller LoRA rank")
    return ""


def diagnose(history: pd.DataFrame) -> str:
    """A plain-words reading of the curves so far: diverging, over-fitting, under-fitting or learning.

    Training loss is read as means over windows of steps (`loss_windows`), never one logged value:
    batches of different lengths have different losses. Under-fitting: after 10 logged steps and
    3 validations, training loss is still above 80% of where it started and validation loss has
    not improved by 5%."""
    train = history.dropna(subset=["train_loss"]) if len(history) else history
    val = history.dropna(subset=["val_loss"]) if len(history) else history
    preference = preference_failure(history)
    if preference:
        return preference
    if len(train) < 3 and len(val) < 2:
        return "too early to tell: waiting for more steps"
    verdict = diverging(train) or (over_fitting(train, val) if len(val) >= 3 else "")
    if verdict:
        return verdict
    if len(train) < 2:
        return "too early to tell: waiting for more steps"
    first, last = (float(w.mean()) for w in loss_windows(train))
    if len(train) >= 10 and len(val) >= 3:
        val_gain = 1 - val["val_loss"].iloc[-1] / val["val_loss"].iloc[0]
        if last > 0.8 * first and val_gain < 0.05:
            return (f"under-fitting: training loss only went from {first:.3f} to {last:.3f} and validation loss "
                    "is flat; raise the learning rate, train longer or use a larger LoRA rank")
    text = f"learning: training loss {first:.3f} -> {last:.3f} (means of the first and last steps logged)"
    if len(val) >= 2:
        text += f", validation loss {val['val_loss'].iloc[0]:.3f} -> {val['val_loss'].iloc[-1]:.3f}"
    return text


def preference_failure(history: pd.DataFrame, window: int = 3) -> str:
    """DPO's two failure modes, read from the rewards a preference run logs (training.preference),
    on the training steps (means of the first and of the last `window` logged) and then on the
    validations (the first and the last):
    - the margin grows while both rewards fall: the model lowers both answers, the rejected one
      faster, and moves probability to text that is neither;
    - the chosen answers' log-probability collapses: it fell far below where it started.
    '' when neither."""
    for prefix, size, where in (("", window, "training"), ("val_", 1, "validation")):
        found = rewards_failure(history, prefix, size)
        if found:
            return f"preference ({where} pairs): {found}"
    return ""


def rewards_failure(history: pd.DataFrame, prefix: str, window: int) -> str:
    """One side's failure mode (the columns named with `prefix`), or ''."""
    margin = prefix + "reward_margin"
    if margin not in history or history[margin].notna().sum() < 2 * window:
        return ""
    logged = history.dropna(subset=[margin])
    first, last = (part.mean(numeric_only=True) for part in (logged.head(window), logged.tail(window)))
    head, tail = ({k: part[prefix + k] for k in ("reward_margin", "reward_chosen", "reward_rejected", "logp_chosen")}
                  for part in (first, last))
    if tail["reward_margin"] > head["reward_margin"] and tail["reward_chosen"] < 0 and tail["reward_rejected"] < 0 \
            and tail["reward_chosen"] < head["reward_chosen"]:
        return (f"the margin grew ({head['reward_margin']:.3f} -> {tail['reward_margin']:.3f}) while both rewards "
                f"fell (chosen {tail['reward_chosen']:.3f}, rejected {tail['reward_rejected']:.3f}): the model makes "
                "both answers less likely; raise train.beta, lower the learning rate, or try train.method=orpo, "
                "whose loss keeps the chosen answers likely")
    drop = head["logp_chosen"] - tail["logp_chosen"]
    if drop > max(10.0, 0.5 * abs(head["logp_chosen"])):
        return (f"the chosen answers' log-probability collapsed ({head['logp_chosen']:.1f} -> "
                f"{tail['logp_chosen']:.1f}); raise train.beta, lower the learning rate, or use train.method=orpo")
    return ""
