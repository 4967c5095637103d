"""The walk of a config through `pipeline.run`: which of nb_finetune's files read its fields, in
the order the whole job reads them.

Every field read of every config section is logged with the nb_finetune function that read it
(the nearest one on the stack, for reads made inside other libraries or the standard library,
such as `dataclasses.asdict`); config.py's own reads (validation, saving) count as its own.
Consecutive reads in one file are one stay. The walk reports:
- stays, and rooms (the files it stays in);
- returns: stays in a file the walk had already left, each a climb back to it;
- the stays in pipeline.py, and how often `trackers.check` ran.

The job is the demo preset on a tiny random llama with SmolLM2's tokenizer (2 layers, 64
wide), 2 steps, so it takes seconds; the walk does not depend on the model's size. Run from
the repository root, or with PYTHONPATH pointing at another checkout to walk its code:
    python benchmarks/config_walk.py
    python benchmarks/config_walk.py --out benchmarks/results/config_walk-<date>.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def tiny_llama(folder: Path) -> Path:
    """A 2-layer, 64-wide llama with SmolLM2's tokenizer, saved in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nb_finetune import modeling
    from nb_finetune.config import ModelConfig
    tok = modeling.load_tokenizer(ModelConfig(), progress=lambda m: None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def reader(package: Path) -> tuple[str, str] | None:
    """(file relative to the package, function) of the nearest nb_finetune frame reading a field."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if package in path.parents:
            return str(path.relative_to(package)), frame.f_code.co_name
        frame = frame.f_back
    return None


def logging_section(section, walk: list, package: Path) -> None:
    """Make `section`'s field reads append (file, function, field) to `walk`."""
    cls, names = type(section), {f.name for f in dataclasses.fields(section)}
    label = cls.__name__.removesuffix("Config").lower()

    def __getattribute__(self, name):
        if name in names and (where := reader(package)) is not None:
            walk.append((*where, f"{label}.{name}"))
        return object.__getattribute__(self, name)
    section.__class__ = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__})


def stays(walk: list) -> list[str]:
    """The files of the walk, consecutive reads in one file counted once."""
    out = []
    for file, _, _ in walk:
        if not out or out[-1] != file:
            out.append(file)
    return out


def summary(walk: list, checks: int) -> dict:
    files = stays(walk)
    returns = sum(1 for i, f in enumerate(files) if f in files[:i])
    return {"reads": len(walk), "stays": len(files), "rooms": len(set(files)), "returns": returns,
            "pipeline_stays": files.count("pipeline.py"), "trackers_check_runs": checks,
            "functions": len({(f, fn) for f, fn, _ in walk}), "walk": files}


def walk_the_job(folder: Path) -> dict:
    import nb_finetune
    from nb_finetune import load_preset, pipeline
    from nb_finetune.training import trackers
    package = Path(nb_finetune.__file__).resolve().parent
    cfg = load_preset("demo").with_overrides({
        "model.name": str(tiny_llama(folder / "model")), "train.output_dir": str(folder / "run"),
        "train.max_steps": 2, "train.eval_steps": 1, "train.max_length": 64,
        "eval.num_samples": 1, "eval.max_new_tokens": 2, "eval.max_test_rows": 8})
    walk, checks, check = [], [], trackers.check
    trackers.check = lambda train: checks.append(1) or check(train)
    for f in dataclasses.fields(cfg):
        logging_section(getattr(cfg, f.name), walk, package)
    pipeline.run(cfg, progress=lambda m: None)
    return summary(walk, len(checks)) | {"package": str(package), "commit": commit(package.parent)}


def commit(repo: Path) -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="write the figures and the walk to this JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = walk_the_job(Path(tmp))
    print(f"{found['package']} at {found['commit']}: {found['reads']} field reads by {found['functions']} functions; "
          f"{found['stays']} stays in {found['rooms']} files, {found['returns']} returns to a file already left; "
          f"pipeline.py {found['pipeline_stays']} stays; trackers.check ran {found['trackers_check_runs']} times")
    print(" -> ".join(found["walk"]))
    if args.out:
        Path(args.out).write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
