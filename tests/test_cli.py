"""The command line: one-line errors (no traceback), exit status 2, user files untouched."""
import subprocess
import sys

import pytest
import yaml
from conftest import SUBPROCESS_ENV, mentions, sst2_dev

from nb_finetune.cli import main
from nb_finetune.data.bias_scan import DEFAULT_GROUPS


def _config(tmp_path, **sections):
    raw = {"data": {"source": str(tmp_path / "data.csv")}, "train": {"output_dir": str(tmp_path / "out")}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _data(tmp_path, shared_data, **change):
    df = sst2_dev(shared_data).head(60)
    df = df.rename(columns={"sentence": "text"}).assign(**change)
    df.to_csv(tmp_path / "data.csv", index=False)
    return tmp_path / "data.csv"


CASES = {
    "missing file": ({"data": {"source": "nowhere/data.csv"}}, {}, "data file not found"),
    "unknown column": ({"data": {"text_column": "body"}}, {}, "column 'body' not found"),
    "one class": ({}, {"label": "1"}, "single class"),
    "empty text": ({}, {"text": ""}, "text column is empty in every row"),
    "out of range": ({"train": {"learning_rate": 5.0, "batch_size": 0}}, {}, "2 problems in the config"),
    "unknown model": ({"model": {"name": "no-such-org/no-such-model"}}, {}, "not a built-in name"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line(case, tmp_path, shared_data, capsys):
    sections, change, message = CASES[case]
    data = _data(tmp_path, shared_data, **change)
    config = _config(tmp_path, **sections)
    before = data.read_bytes(), config.read_bytes()
    code = main(["run", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("nb-finetune: error: ") and message in err and "\n" not in err
    assert (data.read_bytes(), config.read_bytes()) == before
    assert not (tmp_path / "out").exists()


def test_empty_data_file(tmp_path, capsys):
    (tmp_path / "data.csv").write_text("")
    assert main(["run", "--config", str(_config(tmp_path))]) == 2
    assert "is empty" in capsys.readouterr().err


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nb_finetune", "run", "--config", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"nb-finetune: error: config file not found: {tmp_path / 'nope.yaml'} "
                                                "(give the path of a .yaml or .json file)"]


def test_assets_list_and_presets(capsys):
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert "asset cache:" in out and "smollm2-135m-instruct" in out and "imdb-sample" in out
    assert main(["presets"]) == 0
    assert "demo" in capsys.readouterr().out.split()
    assert main(["presets", "demo"]) == 0
    assert "imdb-sample" in capsys.readouterr().out


def test_bad_override(capsys):
    assert main(["demo", "--set", "train.epochs"]) == 2
    assert "write section.field=value" in capsys.readouterr().err


@pytest.mark.integration  # the whole job, through a front end
def test_ctrl_c_stops_after_the_step_and_keeps_a_checkpoint(tmp_path, shared_data, tiny_model_dir):
    import signal
    data = _data(tmp_path, shared_data)
    config = _config(tmp_path, model={"name": str(tiny_model_dir), "lora_r": 4},
                     train={"max_steps": 500, "batch_size": 2, "max_length": 48, "logging_steps": 1,
                            "eval_steps": 1000, "save_steps": 1000})
    proc = subprocess.Popen([sys.executable, "-u", "-m", "nb_finetune", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=SUBPROCESS_ENV)
    for line in proc.stdout:
        if line.strip().startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and "resume_from=last" in err and "Traceback" not in err
    checkpoints = list((tmp_path / "out" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 500
    assert (tmp_path / "out" / "history.csv").is_file() and (tmp_path / "out" / "adapter").is_dir()
    assert data.exists()


def test_validate_prints_the_bias_scan_and_a_bad_term_list_in_one_line(tmp_path, shared_data, capsys):
    df = sst2_dev(shared_data).rename(columns={"sentence": "text"})
    df.loc[mentions(df["text"], DEFAULT_GROUPS["age"]["old"]), "label"] = "0"  # a planted skew: old people negative
    df.to_csv(tmp_path / "data.csv", index=False)
    assert main(["validate", "--config", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "! bias scan: groups whose label share differs: 1" in out and "differ: old (" in out
    assert "age / old:" in out and "<- differs" in out
    bad = _config(tmp_path, data={"scan_groups": {"age": {"old": ["old"], "young": ["young", "kid"]}}})
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "age/old needs two or more terms" in err and "Traceback" not in err


def test_set_takes_on_and_off(tmp_path):
    """`--set train.cpu_kernels=off` goes through YAML, which reads off as False."""
    job = tmp_path / "job"
    assert main(["export", "--preset", "demo", "--set", "train.cpu_kernels=off", "--set", "train.liger_kernel=on",
                 "--output", str(job)]) == 0
    train = yaml.safe_load((job / "config.yaml").read_text())["train"]
    assert (train["cpu_kernels"], train["liger_kernel"]) == ("off", "on")
