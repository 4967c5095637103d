"""Every run recorded in its folder and listed by `nb-finetune runs`: finished, stopped, failed
and killed runs; the settings a run changed; figures that match its history; bad folders
skipped and counted, and nothing modified by reading."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from conftest import SUBPROCESS_ENV
from tiny_runs import StopAt, sst2_csv, write_config

from nb_finetune import UserError, runs
from nb_finetune.cli import main
from nb_finetune.pipeline import run
from nb_finetune.runs.record import RECORD
from nb_finetune.training.progress import Callback


@pytest.fixture
def sst2_file(tmp_path, shared_data):
    return sst2_csv(tmp_path, shared_data)


class CrashAt(Callback):
    def on_log(self, row, history):
        if row["step"] >= 2:
            raise RuntimeError("the disk went away")


@pytest.mark.integration  # three whole jobs, through the command line
def test_two_learning_rates_and_a_stopped_run_are_all_kept_and_listed(tmp_path, tiny_model_dir, sst2_file, capsys):
    config = write_config(tmp_path, tiny_model_dir, sst2_file)
    assert main(["run", "--config", config]) == 0
    assert main(["run", "--config", config, "--set", "train.learning_rate=3e-3"]) == 0
    stop = threading.Event()
    from nb_finetune import RunConfig
    cfg = RunConfig.load(config).with_overrides({"train.learning_rate": 1e-4})
    session = run(cfg, [StopAt(stop, 2)], stop, progress=lambda m: None)
    assert session.train_result.stopped and session.output_dir.name == "demo-3"  # beside, not over, the others
    capsys.readouterr()

    assert main(["runs", "list", "--dir", str(tmp_path / "runs")]) == 0
    listing = capsys.readouterr().out
    found, skipped = runs.find_runs(tmp_path / "runs")
    table = runs.table(found, runs.find(found, "demo")).set_index("run")
    assert skipped == 0 and sorted(table.index) == ["demo", "demo-2", "demo-3"]
    assert table["status"].to_dict() == {"demo": "finished", "demo-2": "finished", "demo-3": "stopped"}
    assert table.loc["demo-2", "changed"] == "learning_rate=0.003" and table.loc["demo", "changed"] == "-"
    assert table.loc["demo-3", "changed"] == "learning_rate=0.0001"
    for name in ("demo", "demo-2", "demo-3"):
        assert name in listing
    for name in ("demo", "demo-2"):  # the record's figures are the history's and the test's
        history = pd.read_csv(tmp_path / "runs" / name / "history.csv")
        assert table.loc[name, "val_loss"] == pytest.approx(history["val_loss"].dropna().iloc[-1], abs=1e-5)
        assert table.loc[name, "steps"] == 6 == history["step"].max()
        metrics = pd.read_csv(tmp_path / "runs" / name / "test_metrics.csv", index_col=0)
        assert table.loc[name, "test"] == pytest.approx(metrics.loc["tuned", "accuracy"])
    assert pd.isna(table.loc["demo-3", "test"]) and table.loc["demo-3", "steps"] == 2

    record = json.loads((tmp_path / "runs" / "demo-2" / RECORD).read_text())
    assert record["config"]["train"]["learning_rate"] == 0.003 and record["versions"]["torch"]
    assert record["data"]["rows"]["train"] > 0 and len(record["data"]["digest"]["test"]) == 16
    assert record["hardware"]["device"] == "cpu" and record["seconds"] > 0

    assert main(["runs", "diff", "demo", "demo-2", "--dir", str(tmp_path / "runs")]) == 0
    diff = capsys.readouterr().out
    assert "train.learning_rate" in diff and "0.003" in diff and "lora_r" not in diff
    assert main(["runs", "show", "demo-3", "--dir", str(tmp_path / "runs")]) == 0
    assert "status: stopped" in capsys.readouterr().out
    curves = runs.curves(found, runs.find(found, "demo"))
    assert set(curves["split"]) == {"train", "validation"} and curves["run"].nunique() == 3

    stopped = json.loads((tmp_path / "runs" / "demo-3" / RECORD).read_text())  # resumed: the same run, finished
    run(cfg.with_overrides({"train.resume_from": "last", "train.output_dir": str(tmp_path / "runs" / "demo-3")}),
        progress=lambda m: None)
    resumed = json.loads((tmp_path / "runs" / "demo-3" / RECORD).read_text())
    assert resumed["status"] == "finished" and resumed["training"]["steps"] == 6
    assert resumed["started"] == stopped["started"] and len(resumed["resumed"]) == 1
    assert resumed["seconds"] > stopped["seconds"] and len(runs.find_runs(tmp_path / "runs")[0]) == 3


def test_a_run_that_crashes_is_recorded_failed_with_its_history(tmp_path, tiny_model_dir, sst2_file):
    from nb_finetune import RunConfig
    cfg = RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file))
    with pytest.raises(RuntimeError, match="disk went away"):
        run(cfg, [CrashAt()], progress=lambda m: None)
    (found,), _ = runs.find_runs(tmp_path / "runs")
    assert found.status == "failed" and found.record["error"] == "RuntimeError: the disk went away"
    assert found.history()["step"].max() >= 2


@pytest.mark.slow
def test_a_killed_process_leaves_an_interrupted_run_with_its_curve(tmp_path, tiny_model_dir, sst2_file):
    config = write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=2000, eval_steps=1000, save_steps=1000)
    proc = subprocess.Popen([sys.executable, "-u", "-m", "nb_finetune", "run", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=SUBPROCESS_ENV)
    seen = 0
    for line in proc.stdout:
        seen += line.strip().startswith("step")
        if seen >= 3:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)  # as a kernel restart does: no handler runs
    proc.wait(timeout=60)
    (found,), _ = runs.find_runs(tmp_path / "runs")
    assert found.record["status"] == "running" and found.status == "interrupted"
    assert found.history()["step"].max() >= 1 and found.record["training"]["steps"] >= 1


def test_bad_folders_are_skipped_and_counted_and_nothing_is_modified(tmp_path, tiny_model_dir, sst2_file, capsys):
    from nb_finetune import RunConfig
    run(RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=3)), progress=lambda m: None)
    root = tmp_path / "runs"
    (root / "half").mkdir()
    (root / "half" / RECORD).write_text('{"format": "nb_finetune.run/1", "status": ')  # cut off mid-write
    (root / "foreign").mkdir()
    (root / "foreign" / "report.json").write_text(json.dumps({"accuracy": 0.9}))
    (root / "other-tool").mkdir()
    (root / "other-tool" / RECORD).write_text(json.dumps({"format": "somebody-else/2"}))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}

    assert main(["runs", "list", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "3 folder(s)" in out
    assert main(["runs", "compare", "demo", "--dir", str(root)]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()} == before

    (tmp_path / "empty").mkdir()
    assert main(["runs", "list", "--dir", str(tmp_path / "empty")]) == 0
    assert "no runs in" in capsys.readouterr().out
    for argv, words in ((["runs", "list", "--dir", str(tmp_path / "nowhere")], "no folder of runs"),
                        (["runs", "show", "nope", "--dir", str(root)], "no run named 'nope'"),
                        (["runs", "diff", "demo", "--dir", str(root)], "give 2 run name(s)")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1


def test_delete_removes_only_a_folder_that_holds_a_run(tmp_path, tiny_model_dir, sst2_file):
    from nb_finetune import RunConfig
    cfg = RunConfig.load(write_config(tmp_path, tiny_model_dir, sst2_file, max_steps=3))
    for _ in range(2):
        run(cfg, progress=lambda m: None)
    found, _ = runs.find_runs(tmp_path / "runs")
    runs.delete(runs.find(found, "demo-2"))
    assert [r.name for r in runs.find_runs(tmp_path / "runs")[0]] == ["demo"]
    only = runs.find(found, "demo")
    (only.folder / RECORD).unlink()  # no longer a run: refused
    with pytest.raises(UserError, match="holds no run record"):
        runs.delete(only)
    assert only.folder.is_dir()
