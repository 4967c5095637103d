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
            figures.memory_figure({"weights": 2**30, "activations": 2**29}, 2**34)]
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
