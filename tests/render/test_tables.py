"""HTML tables: long texts shortened between words, around an ellipsis; figures beside their intervals."""
from __future__ import annotations


def test_long_texts_are_cut_between_words_with_an_ellipsis():
    from nb_finetune.render.tables import shorten, table_html
    words = [f"word{i}" for i in range(100)]
    text = " ".join(words)
    for n in (30, 61, 120, 160):
        short = shorten(text, n)
        head, tail = short.split(" \u2026 ")
        assert len(short) <= n and head and tail
        assert set(head.split()) | set(tail.split()) <= set(words)  # whole words only
        assert text.startswith(head) and text.endswith(tail)
    assert shorten("a  short\ntext", 160) == "a short text"
    assert shorten("x" * 50 + " tail", 20).startswith("x") and len(shorten("x" * 50 + " tail", 20)) <= 20
    cell = table_html(__import__("pandas").DataFrame({"text": [" ".join(words * 2)]}))
    assert "\u2026" in cell and "wor \u2026" not in cell and "word99</td>" in cell


def test_interval_cells_put_each_figure_beside_its_interval():
    import pandas as pd

    from nb_finetune.render.tables import interval_cells
    frame = pd.DataFrame({("base", "share"): [0.5, 0.25], ("base", "share_low"): [0.4, 0.125],
                          ("base", "share_high"): [0.6, 0.375], ("base", "pairs"): [10.0, 4.0]}, index=["all", "age"])
    cells = interval_cells(frame)
    assert list(cells.columns) == ["base share", "base pairs"]
    assert cells.loc["age", "base share"] == "0.250 [0.125, 0.375]" and cells.loc["all", "base pairs"] == "10.000"
