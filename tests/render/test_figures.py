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
