"""The figures the panels and the engine's rich display show: pure functions, data in, a
matplotlib Figure out, nothing left in pyplot's global state."""
from __future__ import annotations

PNG = b"\x89PNG"


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
