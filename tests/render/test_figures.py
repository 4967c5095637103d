"""The figures the panels and the engine's rich display show: pure functions, data in, a
matplotlib Figure out, nothing left in pyplot's global state."""
from __future__ import annotations

from conftest import PNG


def test_renderers_are_pure_figures():
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.figure import Figure

    from nb_finetune.render import figures
    from nb_finetune.training import HISTORY_COLUMNS
    before = plt.get_fignums()
    figs = [figures.history_figure(pd.DataFrame(columns=HISTORY_COLUMNS)),
            figures.class_balance_figure(pd.Series({"negative": 40, "positive": 60})),
            figures.token_length_figure(pd.Series([10, 20, 30, 64]), 64),
            figures.confusion_figure(pd.DataFrame([[5, 1], [2, 7]], index=["a", "b"], columns=["a", "b"])),
            figures.memory_figure({"weights": 2**30, "activations": 2**29}, 2**34),
            figures.runs_figure(pd.DataFrame(columns=["step", "loss", "run", "split"]))]
    assert all(isinstance(f, Figure) for f in figs)
    assert all(figures.to_png(f).startswith(PNG) for f in figs)
    assert plt.get_fignums() == before  # nothing left in pyplot's global state


def test_the_training_plot_steps_are_whole_numbers():
    """A 17-step run once showed ticks at 2.5, 7.5, ...: a step is a whole number."""
    import numpy as np
    import pandas as pd

    from nb_finetune.render import figures
    from nb_finetune.training import HISTORY_COLUMNS
    for steps in (3, 17):
        rows = [{c: np.nan for c in HISTORY_COLUMNS} | {"step": i, "train_loss": 2.0 / i} for i in range(1, steps + 1)]
        rows[-1] |= {"val_loss": 1.0, "val_accuracy": 0.5}
        fig = figures.history_figure(pd.DataFrame(rows))
        fig.draw_without_rendering()
        for ax in fig.axes:
            labels = [t.get_text().replace("\u2212", "-") for t in ax.get_xticklabels() if t.get_text()]
            assert labels and all(float(t).is_integer() and "." not in t for t in labels), labels


def test_the_runs_plot_has_a_colour_per_run_and_a_line_style_per_split():
    import pandas as pd

    from nb_finetune.render import figures
    long = pd.DataFrame({"step": [1, 2, 2, 1, 2], "loss": [2.0, 1.5, 1.6, 2.1, 1.8],
                         "run": ["a (-)"] * 3 + ["b (lora_r=8)"] * 2,
                         "split": ["train", "train", "validation", "train", "train"]})
    ax = figures.runs_figure(long).axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert len(lines) == 3 and len({line.get_color() for line in lines}) == 2
    assert sorted(line.get_linestyle() for line in lines) == ["-", "-", "--"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (-)", "b (lora_r=8)", "training", "validation"]


def test_pair_lengths_figure_titles_the_share_of_longer_chosen_answers():
    import pandas as pd

    from nb_finetune.render.figures import pair_lengths_figure, to_png
    lengths = pd.DataFrame({"chosen": [10, 30, 50, 5], "rejected": [20, 10, 40, 5]})
    fig = pair_lengths_figure(lengths)
    assert fig.axes[0].get_title() == "chosen longer in 50% of pairs"  # 2 of 4; a tie is not longer
    assert to_png(fig).startswith(PNG)


def test_preference_curves_show_rewards_margin_and_accuracy_for_training_and_validation():
    import numpy as np
    import pandas as pd

    from nb_finetune.render import figures
    steps = np.arange(1, 7)
    history = pd.DataFrame({"step": steps, "train_loss": 0.7 - 0.01 * steps, "reward_chosen": 0.1 * steps,
                            "reward_rejected": -0.1 * steps, "reward_margin": 0.2 * steps,
                            "reward_accuracy": [0.5, 0.5, 0.75, 0.75, 1.0, 1.0]})
    history["val_loss"] = np.where(steps % 3 == 0, 0.69, np.nan)
    for name in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
        history[f"val_{name}"] = np.where(steps % 3 == 0, history[name], np.nan)
    fig = figures.preference_history_figure(history)
    loss_ax, reward_ax, acc_ax = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["chosen", "rejected", "margin", "training",
                                                                  "validation"]
    assert [line.get_label() for line in reward_ax.get_lines()][:6] == [
        f"reward_{side} ({split})" for side in ("chosen", "rejected", "margin") for split in ("training", "validation")]
    margin = next(line for line in reward_ax.get_lines() if line.get_label() == "reward_margin (validation)")
    assert list(margin.get_xdata()) == [3, 6] and np.allclose(margin.get_ydata(), [0.6, 1.2])
    assert [line.get_label() for line in acc_ax.get_lines()] == ["reward_accuracy (training)",
                                                                 "reward_accuracy (validation)"]
    assert acc_ax.get_ylim()[1] > 1 and loss_ax.get_title() == "loss"


def test_pair_margins_figure_counts_pairs_the_tuning_moved_toward_the_chosen_answer():
    import pandas as pd

    from nb_finetune.render import figures
    preds = pd.DataFrame({"base_margin": [-2.0, 1.0, 3.0, -1.0], "tuned_margin": [1.0, 2.0, 2.5, -3.0]})
    ax = figures.pair_margins_figure(preds).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tuned above base (2)", "not above (2)"]
    assert ax.get_title() == "held-out pairs: tuned prefers chosen in 75%, base in 50%"
