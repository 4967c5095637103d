"""Pictures for the panels and reports: pure functions, data in, a Figure out.

Figures are `matplotlib.figure.Figure` objects drawn with seaborn's `ax=` API, never
pyplot's global state, so they are safe to draw from a training thread and leave nothing
behind in the notebook. `to_png` turns one into bytes for an `ipywidgets.Image`: one trait
update, no flicker, and it reaches every front end (Colab included).
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# One palette for every picture: trained tokens and the tuned model share a colour.
COLORS = {"train": "#1f77b4", "validation": "#d62728", "accuracy": "#2ca02c", "base": "#7f7f7f"}
ROLE_COLORS = {"prompt": "#e8e8e8", "response": "#b7e4c7", "special": "#ffd6a5", "padding": "#f8f9fa"}


def to_png(fig: Figure, dpi: int = 90) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _figure(width: float = 6.0, height: float = 3.0, cols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, cols, squeeze=False)[0]
    return fig, list(axes)


# -- training ----------------------------------------------------------------------------

def history_figure(history: pd.DataFrame, title: str = "") -> Figure:
    """Training and validation loss (left) and validation accuracy (right) against step.
    The step axis spans the steps done so far (the progress bar shows how many remain)."""
    fig, (loss_ax, acc_ax) = _figure(8.0, 3.0, cols=2)
    train = history.dropna(subset=["train_loss"]) if len(history) else history
    val = history.dropna(subset=["val_loss"]) if len(history) else history
    if len(train):
        loss_ax.plot(train["step"], train["train_loss"], color=COLORS["train"], label="training")
    if len(val):
        loss_ax.plot(val["step"], val["val_loss"], "o-", color=COLORS["validation"], label="validation")
    loss_ax.set(xlabel="step", ylabel="loss", title=title or "loss")
    if len(train) or len(val):
        loss_ax.legend(loc="upper right", frameon=False)
    acc = val.dropna(subset=["val_accuracy"]) if len(val) else val
    if len(acc):
        acc_ax.plot(acc["step"], acc["val_accuracy"], "o-", color=COLORS["accuracy"])
    acc_ax.set(xlabel="step", ylabel="accuracy", title="validation accuracy (trained tokens)", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        # Steps are whole numbers: no tick at 2.5, even around a single validation step.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if not len(history):
        loss_ax.text(0.5, 0.5, "waiting for the first step", ha="center", va="center",
                     transform=loss_ax.transAxes, color="gray")
    return fig


def preference_history_figure(history: pd.DataFrame, title: str = "") -> Figure:
    """A preference run's curves against step: the loss; the chosen and rejected rewards and their
    margin; the preference (reward) accuracy. Solid lines are the training logs, dashed lines
    with points the validations; one legend below names the colours and the two styles."""
    from matplotlib.lines import Line2D
    fig, (loss_ax, reward_ax, acc_ax) = _figure(11.0, 3.3, cols=3)
    rewards = [("reward_chosen", "chosen", COLORS["accuracy"]), ("reward_rejected", "rejected", COLORS["validation"]),
               ("reward_margin", "margin", MARGIN_COLOR)]
    panels = [(loss_ax, [("loss", "loss", COLORS["train"])], title or "loss"),
              (reward_ax, rewards, "rewards: chosen, rejected, margin"),
              (acc_ax, [("reward_accuracy", "accuracy", COLORS["accuracy"])], "preference accuracy")]
    for ax, lines, heading in panels:
        for column, _, color in lines:
            _plot_split(ax, history, column, color)
        ax.set(xlabel="step", title=heading)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    reward_ax.axhline(0, color=COLORS["base"], linewidth=0.8)
    acc_ax.set(ylim=(-0.02, 1.02))
    handles = [Line2D([], [], color=color, label=label) for _, label, color in rewards]
    handles += [Line2D([], [], color="#444", label="training"),
                Line2D([], [], color="#444", linestyle="--", marker="o", markersize=4, label="validation")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8)
    if not len(history):
        loss_ax.text(0.5, 0.5, "waiting for the first step", ha="center", va="center",
                     transform=loss_ax.transAxes, color="gray")
    return fig


MARGIN_COLOR = "#9467bd"


def _plot_split(ax, history: pd.DataFrame, column: str, color: str) -> None:
    """One quantity's training line and its validation points (the history's val_ column)."""
    train_col = "train_loss" if column == "loss" else column
    for name, col, style in (("training", train_col, "-"), ("validation", f"val_{column}", "o--")):
        if col in history and history[col].notna().any():
            part = history.dropna(subset=[col])
            ax.plot(part["step"], part[col], style, color=color, markersize=4, label=f"{column} ({name})")


# -- data --------------------------------------------------------------------------------

def class_balance_figure(balance: pd.Series) -> Figure:
    import seaborn as sns
    fig, (ax,) = _figure(4.0, max(1.6, 0.35 * len(balance) + 0.8))
    frame = balance.rename_axis("label").reset_index(name="rows")
    frame["label"] = frame["label"].astype(str)
    sns.barplot(data=frame, y="label", x="rows", ax=ax, color=COLORS["train"], orient="h")
    ax.set(title="class balance", xlabel="rows", ylabel="")
    for i, v in enumerate(frame["rows"]):
        ax.text(v, i, f" {v:,}", va="center")
    return fig


BIAS_KINDS = {"differs from its baseline": COLORS["validation"], "possible (one comparison's interval)": "#ff7f0e",
              "too few rows to test": "#bbbbbb", "no difference beyond its interval": COLORS["train"]}


def bias_scan_figure(scan) -> Figure:
    """Each group's share of the compared label against the share over all rows: a dot with its
    interval for the rows naming it and no other group of its axis, a ring for all the rows
    naming it (other groups beside it or not); red where the group differs, orange where it may,
    grey where it has too few rows to tell."""
    shown = scan.groups[scan.groups["rows"] > 0].reset_index(drop=True)
    fig, (ax,) = _figure(7.5, 0.3 * len(shown) + 1.6)
    names = [f"{a} / {g} ({n:,}, {c:,} alone)" for a, g, n, c in zip(shown["axis"], shown["group"], shown["rows"],
                                                                    shown["compared_rows"])]
    y = np.arange(len(shown))
    differs, maybe, few, within = BIAS_KINDS
    tested = shown["tested"].astype(bool) | shown["adjusted_tested"].astype(bool)
    kinds = np.where(shown["flagged"], differs, np.where(shown["possible"], maybe, np.where(~tested, few, within)))
    for kind in dict.fromkeys(kinds):
        part = kinds == kind
        ax.errorbar(shown["share"][part], y[part], fmt="o", color=BIAS_KINDS[kind], capsize=3, label=kind,
                    xerr=[(shown["share"] - shown["low"])[part], (shown["high"] - shown["share"])[part]])
        ax.scatter(shown["mention_share"][part], y[part], s=60, facecolors="none", edgecolors=BIAS_KINDS[kind])
    ax.scatter([], [], s=60, facecolors="none", edgecolors="black", label="all rows naming it")
    ax.axvline(scan.label_share, color="black", linestyle="--", linewidth=1, label="all rows")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set(title=f"share labelled {scan.label!r} by group (rows naming it alone: dot and interval; all: ring)",
           xlabel="share", ylabel="", xlim=(-0.02, 1.02))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="x")
    fig.legend(frameon=False, fontsize=8, loc="outside lower center", ncol=3)
    return fig


def token_length_figure(lengths: pd.Series, max_length: int | None) -> Figure:
    """Histogram of token lengths, with the max_length they were cut to (when known)."""
    import seaborn as sns
    fig, (ax,) = _figure(4.5, 2.6)
    sns.histplot(x=np.asarray(lengths), ax=ax, bins=min(40, max(5, len(lengths) // 5)), color=COLORS["train"])
    if max_length:
        ax.axvline(max_length, color=COLORS["validation"], linestyle="--", label=f"max_length {max_length}")
        ax.legend(frameon=False)
    ax.set(title="tokens per row (train)", xlabel="tokens", ylabel="rows")
    return fig


def pair_lengths_figure(lengths: pd.DataFrame) -> Figure:
    """Preference pairs' length bias: how much longer each chosen answer is than its rejected
    one (characters), with the share of pairs where the chosen one is the longer; 0 is marked."""
    import seaborn as sns
    fig, (ax,) = _figure(4.5, 2.6)
    diff = (lengths["chosen"] - lengths["rejected"]).to_numpy()
    sns.histplot(x=diff, ax=ax, bins=min(40, max(5, len(diff) // 5)), color=COLORS["train"])
    ax.axvline(0, color=COLORS["base"], linestyle="--")
    ax.set(title=f"chosen longer in {np.mean(diff > 0):.0%} of pairs", xlabel="chosen - rejected (characters)",
           ylabel="pairs")
    return fig


def pair_margins_figure(predictions: pd.DataFrame) -> Figure:
    """Each held-out pair's margin, log p(chosen) - log p(rejected), under the base (x) and the
    tuned model (y). Above the diagonal the tuned model prefers the chosen answer more than the
    base did; right of or above 0, that model prefers it at all."""
    fig, (ax,) = _figure(4.6, 4.0)
    x, y = predictions["base_margin"].to_numpy(), predictions["tuned_margin"].to_numpy()
    better = y > x
    ax.scatter(x[better], y[better], s=18, color=COLORS["accuracy"], label=f"tuned above base ({better.sum()})")
    ax.scatter(x[~better], y[~better], s=18, color=COLORS["validation"], label=f"not above ({(~better).sum()})")
    low, high = float(min(x.min(), y.min(), 0)), float(max(x.max(), y.max(), 0))
    pad = 0.05 * (high - low or 1)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color=COLORS["base"], linewidth=0.8)
    ax.axhline(0, color=COLORS["base"], linestyle=":", linewidth=0.8)
    ax.axvline(0, color=COLORS["base"], linestyle=":", linewidth=0.8)
    ax.set(xlabel="base margin (log p chosen - log p rejected)", ylabel="tuned margin",
           title=f"held-out pairs: tuned prefers chosen in {np.mean(y > 0):.0%}, base in {np.mean(x > 0):.0%}")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    return fig


def confusion_figure(confusion: pd.DataFrame) -> Figure:
    import seaborn as sns
    n = len(confusion)
    fig, (ax,) = _figure(1.2 + 0.8 * n, 0.9 + 0.7 * n)
    sns.heatmap(confusion, annot=True, fmt="d", cmap="Blues", cbar=False, ax=ax)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (tuned)")
    return fig


# -- tables ------------------------------------------------------------------------------

def memory_figure(parts: dict, available: int | None = None, measured: int | None = None) -> Figure:
    """The memory estimate as one stacked bar (GiB), beside what the device has."""
    fig, (ax,) = _figure(7.0, 1.5)
    gib = 2 ** 30
    left = 0.0
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for i, (name, value) in enumerate(parts.items()):
        ax.barh([0], [value / gib], left=left, color=palette[i % len(palette)], label=name)
        left += value / gib
    title = f"memory estimate: {left:.2f} GiB"
    if available:
        title += f" of {available / gib:.0f} GiB on the device"
        if available < 3 * left:  # only where the limit is near enough to read beside the bar
            ax.axvline(available / gib, color="black", linestyle="--", label="device memory")
    if measured:
        ax.axvline(measured / gib, color="#d62728", linestyle=":", label=f"measured {measured / gib:.2f} GiB")
    ax.set(yticks=[], xlabel="GiB", title=title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    return fig


def probe_figure(long: pd.DataFrame, ideal: float | None = None, title: str = "", xlabel: str = "") -> Figure:
    """Mean per group with its 95% bootstrap interval (seaborn), one colour per model.

    `long`: one row per scored item with columns group, value, model (e.g. base, tuned)."""
    import seaborn as sns
    groups = list(dict.fromkeys(long["group"]))
    fig, (ax,) = _figure(6.5, 0.45 * len(groups) + 1.2)
    palette = dict(zip(dict.fromkeys(long["model"]), [COLORS["base"], COLORS["train"], COLORS["validation"],
                                                      COLORS["accuracy"]]))
    sns.pointplot(data=long, x="value", y="group", hue="model", order=groups, palette=palette, errorbar=("ci", 95),
                  n_boot=1000, seed=0, dodge=0.4, linestyle="none", capsize=0.15, ax=ax)
    if ideal is not None:
        ax.axvline(ideal, color="black", linestyle="--", linewidth=1, label=f"ideal {ideal:g}")
    ax.set(title=title, xlabel=xlabel, ylabel="")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(frameon=False, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


# -- runs --------------------------------------------------------------------------------

def runs_figure(long: pd.DataFrame, title: str = "loss of each run", value: str = "loss") -> Figure:
    """Several runs' curves overlaid: one colour per run (its label says what it changed), a
    solid line for training and a dashed one with points for validation.

    `long`: one row per logged value with columns run, step, split (train/validation) and `value`
    (loss, reward_margin or reward_accuracy)."""
    import seaborn as sns
    from matplotlib.lines import Line2D
    labels = list(dict.fromkeys(long["run"]))
    fig, (ax,) = _figure(7.5, 3.2)
    palette = dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", len(labels))))
    styles = {"train": {"linestyle": "-"}, "validation": {"linestyle": "--", "marker": "o", "markersize": 4}}
    for split, style in styles.items():
        part = long[long["split"] == split]
        if len(part):
            sns.lineplot(data=part, x="step", y=value, hue="run", hue_order=[r for r in labels if r in set(part["run"])],
                         palette=palette, estimator=None, sort=True, legend=False, ax=ax, **style)
    handles = [Line2D([], [], color=palette[r], label=r) for r in labels]
    handles += [Line2D([], [], color="#444", label=name if name == "validation" else "training", **style)
                for name, style in styles.items() if name in set(long["split"])]
    ax.set(xlabel="step", ylabel=value.replace("_", " "), title=title)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if handles:
        ax.legend(handles=handles, frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no curves: choose runs that have logged a step", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    return fig
