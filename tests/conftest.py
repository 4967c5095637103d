"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random llama built from a config,
the real data sets in ../shared/data, and the environment for child processes as a venv that is
not on PATH has it (off_path_env). Also what tests import by name (`from conftest
import ...`): the data sets' readers, a tiny run's config and session, PNG, and
docs/browser_lab.py."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pyproject's addopts run the suite on two pytest-xdist workers, one per core of a 2-core
# machine. Each worker, and every process a test starts, computes on one thread: two workers
# with torch's two threads each would put four spinning threads on two cores. Set before torch
# is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
# Child processes import this checkout's package, whatever an editable install points at.
# The checkout first, then whatever PYTHONPATH already names (packages installed with --target).
SUBPROCESS_ENV = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                               "PYTHONUNBUFFERED": "1"}
PNG = b"\x89PNG"  # how every PNG file starts
# Commands a test must not take from PATH: the venv or kernel environment that runs the tests
# (and holds the package) need not be on it, and the `python` there may lack torch.
FROM_PATH = ("python", "python3", "torchrun", "accelerate", "nb-finetune", "jupyter", "jupyter-lab")


def pytest_collection_modifyitems(config, items):
    """The integration tier is a folder: every test in tests/integration (whole runs, notebooks,
    the browser) is marked `integration`, so `-m "not integration"` leaves the tier out."""
    tier = REPO / "tests" / "integration"
    for item in items:
        if item.path.is_relative_to(tier):
            item.add_marker(pytest.mark.integration)


def load_docs_module(name: str):
    """A module of docs/ (scripts, not a package), loaded by its path once."""
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# JupyterLab and Chromium for the browser tests (tests/integration), with the page helpers and
# the waiting that docs/screenshots.py uses too. Standard library only: cheap to load for every run.
browser_lab = load_docs_module("browser_lab")


def mentions(texts, terms: list[str]):
    """Which texts name one of `terms` as a whole word, any case: a plain regex, independent of
    the bias scan's own word splitting."""
    return texts.str.contains(r"\b(?:" + "|".join(terms) + r")\b", case=False, regex=True)


def sst2_dev(shared_data: Path):
    """SST-2's dev.tsv as GLUE ships it: sentence<TAB>label, quotes left bare, every value a string."""
    import csv

    import pandas as pd
    return pd.read_csv(shared_data / "sst2" / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str)


def alpaca_raw(shared_data: Path):
    """The Alpaca demo set as its JSON has it: instruction, input, output."""
    import json

    import pandas as pd
    path = shared_data / "alpaca_demo" / "alpaca_en_demo.json"
    return pd.DataFrame(json.loads(path.read_text(encoding="utf-8")))


def alpaca(shared_data: Path, rows: slice = slice(None)):
    """Alpaca demo rows mapped to the completion task's prompt and completion."""
    from nb_finetune import config, data
    return data.normalize(alpaca_raw(shared_data).iloc[rows], config.DataConfig(task="completion"))


def tiny_run_config(model_dir: Path, tmp_path: Path, **train):
    """SST-2 classification on the tiny llama: 6 steps, validation every 3, written under tmp_path/run;
    `train` overrides the train section."""
    from nb_finetune import RunConfig
    base = {"output_dir": str(tmp_path / "run"), "max_steps": 6, "batch_size": 4, "eval_steps": 3,
            "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3}
    return RunConfig.from_dict({
        "data": {"text_column": "sentence", "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": str(model_dir), "lora_r": 4, "lora_alpha": 8},
        "train": base | train, "eval": {"num_samples": 1, "max_new_tokens": 4}})


def prepared_session(cfg, frame):
    """A Session that says nothing, `frame` prepared."""
    from nb_finetune.pipeline import Session
    session = Session(cfg, progress=lambda m: None)
    session.prepare_data(frame)
    return session


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not here")
    return SHARED_DATA


@pytest.fixture(scope="session")
def off_path_env(tmp_path_factory) -> dict:
    """SUBPROCESS_ENV as a venv's Python has it when the venv is not on PATH: this interpreter's
    folder off PATH, and first on PATH a command of each FROM_PATH name that fails, naming itself."""
    stubs = tmp_path_factory.mktemp("off-path")
    for name in FROM_PATH:
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} was taken from PATH: $0 $*" >&2\nexit 97\n')
        (stubs / name).chmod(0o755)
    here = os.path.realpath(os.path.dirname(sys.executable))
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) != here]
    return SUBPROCESS_ENV | {"PATH": os.pathsep.join([str(stubs), *kept])}


@pytest.fixture
def lab(tmp_path, off_path_env):
    """JupyterLab serving tmp_path, off the interpreter's PATH, for the browser tests; a missing
    browser skips, or fails under NB_FINETUNE_REQUIRE_BROWSER (as CI sets)."""
    why = browser_lab.missing()
    if why:
        if os.environ.get("NB_FINETUNE_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    started = browser_lab.start_lab(tmp_path, off_path_env)
    yield started
    browser_lab.stop_lab(started)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder from the asset cache (fetched once)."""
    from nb_finetune import assets
    return assets.model_path("smollm2-135m-instruct", progress=lambda m: None)


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """The real Gemma 3 270M base folder from the asset cache (fetched and converted once)."""
    from nb_finetune import assets
    return assets.model_path("gemma3-270m", progress=lambda m: None)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir, tokenizer) -> Path:
    """A 2-layer, 64-wide llama with SmolLM2's tokenizer: trains in seconds, same code paths."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def sst2_pairs_file(shared_data, tmp_path) -> Path:
    """30 preference pairs as JSON lines: a positive SST-2 sentence chosen, a negative one rejected."""
    import pandas as pd
    dev = sst2_dev(shared_data)
    pos, neg = dev[dev.label == "1"].sentence.head(30), dev[dev.label == "0"].sentence.head(30)
    path = tmp_path / "pairs.jsonl"
    pd.DataFrame({"prompt": [f"Write a positive review sentence ({i})." for i in range(30)], "chosen": pos.values,
                  "rejected": neg.values}).to_json(path, orient="records", lines=True)
    return path


@pytest.fixture
def sst2_frame(shared_data):
    """40 SST-2 rows as a small labelled frame (real text, both classes)."""
    return sst2_dev(shared_data).groupby("label").head(20).reset_index(drop=True)


# -- the panels' tests (tests/ui) -----------------------------------------------------------

@pytest.fixture
def ui_config(tiny_model_dir, tmp_path) -> dict:
    """The tiny llama on a classification task: 12 steps in seconds."""
    return {"data": {"task": "classification", "label_names": {"0": "negative", "1": "positive"}},
            "model": {"name": str(tiny_model_dir), "lora_r": 4, "lora_alpha": 8},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "batch_size": 4, "eval_steps": 4,
                      "logging_steps": 1, "max_length": 64, "learning_rate": 1e-3},
            "eval": {"num_samples": 2, "max_new_tokens": 4}}


@pytest.fixture
def sst2_120(shared_data):
    """120 SST-2 rows, 60 of each class."""
    return sst2_dev(shared_data).groupby("label").head(60).reset_index(drop=True)
