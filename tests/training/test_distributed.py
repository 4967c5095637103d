"""The same run on several processes through torchrun and accelerate (gloo on this CPU). Every
process is started from this interpreter, with its folder off PATH and failing `python`,
`torchrun`, `accelerate` and `nb-finetune` first on PATH (conftest's off_path_env): a job folder
written from a venv or a kernel that is not on PATH still runs."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from nb_finetune import RunConfig
from nb_finetune.cli import main
from nb_finetune.export.job import export_job


def _config(tmp_path, tiny_model_dir, sst2_frame, name="job", **train):
    sst2_frame.to_csv(tmp_path / "data.csv", index=False)
    return RunConfig.from_dict({
        "data": {"source": str(tmp_path / "data.csv"), "text_column": "sentence", "val_fraction": 0.2,
                 "test_fraction": 0.2},
        "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_dropout": 0.0},
        "train": {"output_dir": str(tmp_path / f"{name}-out"), "max_steps": 6, "batch_size": 2, "eval_steps": 3,
                  "save_steps": 3, "logging_steps": 1, "max_length": 48, "learning_rate": 1e-3} | train,
        "eval": {"num_samples": 1, "max_new_tokens": 2}})


def _job(tmp_path, tiny_model_dir, sst2_frame, name="job", **train):
    cfg = tmp_path / f"{name}.yaml"
    _config(tmp_path, tiny_model_dir, sst2_frame, name, **train).save(cfg)
    folder = tmp_path / name
    assert main(["export", "--config", str(cfg), "--output", str(folder)]) == 0
    return folder


def _launch(script, env, *extra):
    proc = subprocess.run(["bash", str(script), *extra], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _one_run_of_outputs(out, stdout, steps, processes):
    assert stdout.count("training:") == 1 and stdout.count("test results:") == 1  # only the main process talks
    assert f"x {processes} process(es)" in stdout
    history = pd.read_csv(out / "history.csv")
    assert history["step"].tolist() == list(range(1, steps + 1))  # one history, each step once
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["training"]["steps"] == steps
    return history


def test_export_writes_a_complete_job(tmp_path, tiny_model_dir, sst2_frame):
    folder = _job(tmp_path, tiny_model_dir, sst2_frame)
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.yaml", "launch_torchrun.sh", "launch_accelerate.sh", "accelerate_ddp.yaml",
                     "accelerate_fsdp.yaml", "accelerate_deepspeed.yaml", "README.md"}
    assert RunConfig.load(folder / "config.yaml") == RunConfig.load(tmp_path / "job.yaml")
    for name in ("launch_torchrun.sh", "launch_accelerate.sh"):
        assert os.access(folder / name, os.X_OK)
        assert subprocess.run(["bash", "-n", str(folder / name)]).returncode == 0
    kinds = {n: yaml.safe_load((folder / n).read_text())["distributed_type"]
             for n in names if n.startswith("accelerate_")}
    assert kinds == {"accelerate_ddp.yaml": "MULTI_GPU", "accelerate_fsdp.yaml": "FSDP",
                     "accelerate_deepspeed.yaml": "DEEPSPEED"}


# Stands in for a Python: records how it was called; as `-c` (the GPU count) it answers 0.
RECORDER = '#!/bin/sh\necho "$0 $*" >> "$CALLS"\necho 0\n'


def _recorder(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script, launcher", [("launch_torchrun.sh", "-m torch.distributed.run --nproc_per_node 2"),
                                              ("launch_accelerate.sh", "-m accelerate.commands.launch --config_file")])
def test_scripts_run_the_python_that_wrote_them_unless_told(tmp_path, tiny_model_dir, sst2_frame, off_path_env,
                                                            script, launcher):
    """The writer's Python by default; PYTHON when set; python from PATH when the writer is gone."""
    cfg = _config(tmp_path, tiny_model_dir, sst2_frame)
    writer, other, on_path = (_recorder(tmp_path / d / "python") for d in ("venv bin", "other", "path"))
    env = off_path_env | {"CALLS": str(tmp_path / "calls")}
    cases = [(export_job(cfg, tmp_path / "job", python=str(writer)), env, writer),
             (tmp_path / "job", env | {"PYTHON": str(other)}, other),
             (export_job(cfg, tmp_path / "moved", python=str(tmp_path / "gone" / "python")),
              env | {"PATH": f"{on_path.parent}{os.pathsep}{env['PATH']}"}, on_path)]
    for folder, run_env, python in cases:
        (tmp_path / "calls").unlink(missing_ok=True)
        _launch(folder / script, run_env, "--set", "train.max_steps=1")
        gpus, job = (tmp_path / "calls").read_text().splitlines()
        assert gpus.startswith(f"{python} -c import torch")
        assert job.startswith(f"{python} {launcher}") and job.endswith("-m nb_finetune run --config config.yaml "
                                                                        "--set train.max_steps=1"), job


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_model_dir, sst2_frame, off_path_env):
    """PYTHON unset: the script runs the interpreter that wrote it."""
    folder = _job(tmp_path, tiny_model_dir, sst2_frame)
    stdout = _launch(folder / "launch_torchrun.sh", off_path_env | {"NPROC_PER_NODE": "2", "MASTER_PORT": "29531"})
    _one_run_of_outputs(tmp_path / "job-out", stdout, 6, 2)


@pytest.mark.slow
def test_accelerate_two_processes(tmp_path, tiny_model_dir, sst2_frame, off_path_env):
    """PYTHON set, as a user does for another environment."""
    folder = _job(tmp_path, tiny_model_dir, sst2_frame)
    stdout = _launch(folder / "launch_accelerate.sh",
                     off_path_env | {"PYTHON": sys.executable, "NUM_PROCESSES": "2", "MAIN_PROCESS_PORT": "29532"})
    _one_run_of_outputs(tmp_path / "job-out", stdout, 6, 2)
    # accelerate's --cpu flag forces one process: the same job, one history and one adapter
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                           "-m", "nb_finetune", "run", "--config", "config.yaml",
                           "--set", f"train.output_dir={tmp_path / 'cpu-out'}"],
                          cwd=folder, capture_output=True, text=True, timeout=600, env=off_path_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _one_run_of_outputs(tmp_path / "cpu-out", proc.stdout, 6, 1)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_effective_batch(tmp_path, tiny_model_dir, sst2_frame, off_path_env):
    """effective_batch 8: 1 process x batch 2 x 4 accumulation vs 2 processes x batch 2 x 2."""
    folder = _job(tmp_path, tiny_model_dir, sst2_frame, effective_batch=8, max_steps=8, eval_steps=4,
                  save_steps=4, learning_rate=3e-3)
    one = subprocess.run([sys.executable, "-m", "nb_finetune", "run", "--config", "config.yaml", "--set",
                          f"train.output_dir={tmp_path / 'one'}"], cwd=folder, capture_output=True, text=True,
                         env=off_path_env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "effective batch 8 (2 per process x 1 process(es) x 4 accumulation)" in one.stdout
    two = _launch(folder / "launch_torchrun.sh", off_path_env | {"NPROC_PER_NODE": "2", "MASTER_PORT": "29533"},
                  "--set", f"train.output_dir={tmp_path / 'two'}")
    assert "effective batch 8 (2 per process x 2 process(es) x 2 accumulation)" in two
    a = pd.read_csv(tmp_path / "one" / "history.csv")
    b = pd.read_csv(tmp_path / "two" / "history.csv")
    # Different shards give different batches, so the curves match in level and trend, not value.
    assert abs(a["train_loss"].mean() - b["train_loss"].mean()) < 0.01 * a["train_loss"].mean()
    va, vb = a["val_loss"].dropna().to_numpy(), b["val_loss"].dropna().to_numpy()
    assert abs(va[-1] - vb[-1]) < 0.01 * va[-1]
    assert (va[-1] < va[0]) and (vb[-1] < vb[0])


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one(tmp_path, tiny_model_dir, sst2_frame, off_path_env):
    folder = _job(tmp_path, tiny_model_dir, sst2_frame)
    _launch(folder / "launch_torchrun.sh", off_path_env | {"NPROC_PER_NODE": "2", "MASTER_PORT": "29534"},
            "--set", "train.max_steps=3")
    assert (tmp_path / "job-out" / "checkpoints" / "checkpoint-3" / "rng_state_1.pth").is_file()
    proc = subprocess.run([sys.executable, "-m", "nb_finetune", "run", "--config", "config.yaml",
                           "--set", "train.resume_from=last"],
                          cwd=folder, capture_output=True, text=True, env=off_path_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = pd.read_csv(tmp_path / "job-out" / "history.csv")
    assert history["step"].tolist() == [4, 5, 6]  # continued from step 3, on one process
