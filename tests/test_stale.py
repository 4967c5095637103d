"""What a changed setting makes stale: every field of every section changed in turn, the
session's kept results dropped exactly as the field's declared level says (config.first_stale),
and the declarations checked against the work itself: a field that claims not to touch the
tokens leaves them equal, one that claims not to touch the model leaves its weights equal."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_run_config

from nb_finetune.config import SECTIONS, STALE, RunConfig, stale_level
from nb_finetune.pipeline import Session

# Values that pass validation where a field's own type or range gives none.
CHANGES = {("data", "source"): "boolq", ("data", "task"): "completion", ("data", "format"): "csv",
           ("data", "column_names"): ["sentence", "label"], ("data", "label_names"): {"0": "no", "1": "yes"},
           ("data", "text_template"): "{sentence}", ("data", "test_source"): "test.tsv",
           ("data", "counterfactual_terms"): [["he", "she"]], ("data", "scan_groups"): {"g": {"a": ["x"]}},
           ("data", "reweight_groups"): {"a": ["she"], "b": ["he"]},
           ("model", "name"): "other-model", ("model", "target_modules"): "q_proj,v_proj",
           ("train", "output_dir"): "elsewhere", ("train", "resume_from"): "last",
           ("train", "method"): "sft",
           ("eval", "general_source"): "asdiv",
           ("probe", "probes"): ["crows-pairs"], ("probe", "groups"): ["the girl", "the boy"],
           ("probe", "templates"): ["I met {group}."], ("probe", "prompts"): ["{group} was"]}


def changed(section: str, f: dataclasses.Field, value):
    """Another valid value for the field."""
    meta = f.metadata
    if (section, f.name) in CHANGES:
        return CHANGES[section, f.name]
    if "choices" in meta and not isinstance(value, list):
        return next(c for c in meta["choices"] if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        step = 1 if isinstance(value, int) else (meta.get("max", value + 1) - value) / 2 or 0.01
        up = value + step
        return up if meta.get("max") is None or up <= meta["max"] else value - step
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no change known for {section}.{f.name}={value!r}: add one to CHANGES")


def every_field():
    base = RunConfig()
    return [(name, f) for name, klass in SECTIONS.items() for f in dataclasses.fields(klass)
            if changed(name, f, getattr(getattr(base, name), f.name)) is not None]


def with_change(cfg: RunConfig, section: str, f: dataclasses.Field) -> RunConfig:
    value = changed(section, f, getattr(getattr(cfg, section), f.name))
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{f.name: value})})


@pytest.mark.parametrize("section,f", every_field(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_each_field_drops_what_its_level_declares(section, f):
    session = Session(RunConfig(), progress=lambda m: None)
    kept = object()
    session.prep = session.formatter = session.tokenizer = session.model = session.train_result = kept
    new = with_change(session.cfg, section, f)
    session.reconfigure(dataclasses.replace(new, data=dataclasses.replace(new.data, task="classification"))
                        if section != "data" else new)
    level = stale_level(section, f)
    depth = STALE.index(level) if level else len(STALE)
    assert (session.prep is None) == (depth <= 0), level
    assert (session.formatter is None) == (depth <= 1), level
    assert (session.model is None) == (depth <= 2), level


TOKEN_FREE = [(s, f) for s, f in every_field() if s != "data" and stale_level(s, f) not in ("data", "tokens")]
# Fields that say nothing of loading; each changed, the tokens must stay as they were.
SKIP_LOAD = {("train", "resume_from"), ("train", "report_to"), ("model", "quantization"), ("model", "name")}


@pytest.mark.slow
def test_fields_that_leave_the_tokens_leave_them_equal(tiny_model_dir, tmp_path, sst2_frame):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    base = Session(cfg, progress=lambda m: None)
    base.prepare_data(sst2_frame.head(40))
    base.tokenize()
    expected = [dict(r) for r in base.datasets["train"]]
    for section, f in TOKEN_FREE:
        if (section, f.name) in SKIP_LOAD:
            continue
        other = Session(with_change(cfg, section, f), progress=lambda m: None)
        other.prepare_data(sst2_frame.head(40))
        other.tokenize()
        assert [dict(r) for r in other.datasets["train"]] == expected, f"{section}.{f.name} changed the tokens"


MODEL_FREE = [(s, f) for s, f in TOKEN_FREE if stale_level(s, f) is None]


@pytest.mark.slow
def test_fields_that_leave_the_model_load_the_same_weights(tiny_model_dir, tmp_path, sst2_frame):
    cfg = tiny_run_config(tiny_model_dir, tmp_path)

    def weights(config):
        session = Session(config, progress=lambda m: None)
        session.prepare_data(sst2_frame.head(40))
        model = session.load_model()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    expected = weights(cfg)
    for section, f in MODEL_FREE:
        if (section, f.name) in SKIP_LOAD:
            continue
        got = weights(with_change(cfg, section, f))
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), \
            f"{section}.{f.name} changed the loaded model"
    assert not all(torch.equal(a, b) for a, b in zip(weights(with_change(cfg, "train", next(
        f for f in dataclasses.fields(SECTIONS["train"]) if f.name == "seed"))).values(), expected.values()))
