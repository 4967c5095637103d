"""Pair sets read into one shape: WinoBias lines paired, CrowS-Pairs columns checked."""
from __future__ import annotations

import pytest

from nb_finetune.errors import UserError
from nb_finetune.probes.pairs import crows_pairs, winobias


def test_winobias_pairs_pro_and_anti_lines(shared_data):
    pairs = winobias(shared_data / "winobias", "test")
    assert len(pairs.items) + pairs.dropped == 2 * 395
    first = pairs.items.iloc[0]
    assert "[" not in first["more"] and first["more"] != first["less"]
    assert set(pairs.items["bias_type"]) == {"gender (type1)", "gender (type2)"}


def test_a_pair_file_without_its_columns_gets_a_clear_error(tmp_path):
    bad = tmp_path / "pairs.csv"
    bad.write_text("sent_more,bias_type\na,gender\n")
    with pytest.raises(UserError, match="missing column.*sent_less"):
        crows_pairs(bad)
