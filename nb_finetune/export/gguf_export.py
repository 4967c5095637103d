"""Export a tuned model for llama.cpp / Ollama / LM Studio: merge the adapter into the base,
write one GGUF file and an Ollama Modelfile, then verify the file by reading it back.

Everything is written into a hidden sibling folder first and renamed into place only once the
round trip passed, so a failure (a mismatch, a full disk, a bad adapter) leaves nothing
half-written behind, and an existing folder is replaced only when asked (`force`).
"""
from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from . import gguf_file, gguf_vocab, modelfile, roundtrip
from .adapter import adapter_mismatch, merge

_README = """# {name}: the tuned model as GGUF ({quant})

`model.gguf` runs in llama.cpp, Ollama and LM Studio; the tokenizer and chat template are inside.

    ollama create {name} -f Modelfile     # in this folder
    ollama run {name}
    llama-cli -m model.gguf -cnv          # llama.cpp, chat mode

Checked when written: {summary}
"""


@dataclass
class GGUFExport:
    folder: Path
    gguf: Path
    modelfile: Path
    roundtrip: roundtrip.RoundTrip


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} exists: choose another output folder, or replace it (--force, force=True, "
                        "or 'replace' in the Export panel)")


def check_model(cfg: RunConfig, adapter_dir: Path, out: Path, quant: str, chat_template: bool | None = None) -> None:
    """Before loading any weights: refuse a model the writer does not know, a chat template asked of
    a tokenizer that has none, a merge that will not fit in memory, a file that will not fit on disk
    and an adapter from another base."""
    from ..memory import meta_model
    if cfg.model.objective == "head":
        raise UserError("GGUF export needs a language model: a classification head (model.objective='head') "
                        "has no GGUF form")
    model, model_config = meta_model(cfg, "completion", 2)
    gguf_file.architecture(model_config)
    if chat_template:
        from ..modeling import load_tokenizer
        gguf_vocab.check_chat_template(load_tokenizer(cfg.model, lambda m: None), chat_template)
    check_memory(model)
    check_disk(model, out, quant)
    mismatch = adapter_mismatch(adapter_dir, model)
    if mismatch:
        from ..modeling import another_base
        raise another_base(adapter_dir, cfg.model.name, mismatch)


def check_memory(model) -> None:
    import psutil
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    # The merged model in float32 here, and a second float32 copy in the round trip's reader process.
    need, free = 2 * 4 * params, psutil.virtual_memory().available
    if need > free:
        raise UserError(f"merging needs about {need / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB "
                        "is free: use a machine with more memory")


def check_disk(model, out: Path, quant: str) -> None:
    where = next(p for p in out.parents if p.exists())  # out's folder may not exist yet
    need, free = gguf_file.estimated_bytes(model, quant), shutil.disk_usage(where).free
    if need > free:
        raise UserError(f"the {quant} GGUF needs about {need / 2**30:.2f} GiB on disk, {free / 2**30:.2f} "
                        f"GiB is free under {where}: free space or choose another folder")


def write_folder(model, tokenizer, staging: Path, quant: str, name: str, progress,
                 chat_template: bool | None = None) -> roundtrip.RoundTrip:
    """model.gguf, Modelfile and README.md in `staging`; returns the GGUF's passed round trip."""
    model_dir = staging / "tokenizer"
    tokenizer.save_pretrained(str(model_dir))  # SpecialVocab reads merges and ids from these files
    gguf_path = gguf_file.write_gguf(model, tokenizer, model_dir, staging / "model.gguf", quant, name,
                                     chat_template)
    shutil.rmtree(model_dir)
    if chat_template is False:
        tokenizer.chat_template = None  # the file has none: the round trip and Modelfile go without
    mf = staging / "Modelfile"
    mf.write_text(modelfile.modelfile(tokenizer, context=min(4096, model.config.max_position_embeddings)))
    readers = roundtrip.readers(gguf_file.architecture(model.config))
    progress(f"checking the GGUF: reading it back with {' and '.join(readers)} in other processes")
    check = roundtrip.verify(model, tokenizer, gguf_path, quant)
    if not check.ok:
        raise UserError(f"the GGUF does not match the merged model, nothing was written: {check.summary()}")
    (staging / "README.md").write_text(_README.format(name=name, quant=quant, summary=check.summary()))
    return check


def export_gguf(cfg: RunConfig, adapter_dir: str | Path, out: str | Path, quant: str = "f16",
                force: bool = False, progress=print, chat_template: bool | None = None) -> GGUFExport:
    """Merge `adapter_dir` into cfg's base and write `out`/model.gguf, Modelfile and README.md.
    `chat_template`: None stores the tokenizer's template where it has one (a base model without
    one is exported plain), True refuses a tokenizer without one, False leaves it out."""
    out = Path(out).expanduser().resolve()
    gguf_file.check_quant(quant)
    check_destination(out, force)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise UserError(f"no trained adapter in {adapter_dir}: train first, or point to the adapter folder")
    check_model(cfg, Path(adapter_dir), out, quant, chat_template)
    model, tokenizer = merge(cfg, adapter_dir, "completion", None, progress)
    progress(f"writing {quant} GGUF")
    check = write_staged(out, lambda staging: write_folder(model, tokenizer, staging, quant, out.name, progress,
                                                           chat_template))
    return GGUFExport(out, out / "model.gguf", out / "Modelfile", check)


def write_staged(out: Path, write):
    """`write(staging)` into a hidden sibling folder of `out`, renamed to `out` only once it
    returned; on any failure the sibling is removed, and a full disk is said in one line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        result = write(staging)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(f"the disk under {out.parent} is full: free space and export again") from err
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return result
