"""The tutorial notebooks: committed clean, launchable from the README, and executed top to
bottom with small parameters (injected after the cell tagged `parameters`, as papermill does)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# The quickstart runs top to bottom in test_quickstart_fits_binder_memory, with Binder's sizes;
# the others with small parameters. MAX_LENGTH 128: these runs check that every cell works, and
# half the tokens halve the time of their training, validation and test passes (the demo's
# end-to-end test runs its job at 256).
QUICKSTART = REPO / "notebooks" / "01_quickstart.ipynb"
SMALL = {
    "02_sentiment_classification.ipynb": "MAX_ROWS = 80\nMAX_STEPS = 2\nMAX_LENGTH = 128",
    "03_instruction_tuning.ipynb": "MAX_ROWS = 60\nMAX_STEPS = 2",
    "04_qlora_gpu.ipynb": "MAX_STEPS = 2\nMAX_ROWS = 60",
    "05_bias_probe.ipynb": "PAIRS = 12\nMAX_STEPS = 2\nSAMPLES = 1\nMAX_LENGTH = 128",
    "06_preference_tuning.ipynb": "MAX_ROWS = 60\nMAX_STEPS = 2\nGENERAL_ROWS = 8\nPAIRS = 12",
}


@pytest.fixture(scope="module")
def nbformat():
    """nbformat, imported when a notebook test runs: at collection it would cost every test
    process seconds (its JSON schema checks build their grammars on import)."""
    import nbformat
    return nbformat


def test_every_notebook_has_small_parameters_here():
    assert [p.name for p in NOTEBOOKS] == sorted([*SMALL, QUICKSTART.name])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_badges_install_and_parameters(path, nbformat):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "strip the outputs"
    first = nb.cells[0].source
    assert "colab.research.google.com/github/" in first and f"/notebooks/{path.name})" in first
    assert "mybinder.org/v2/gh/" in first and f"labpath=notebooks/{path.name})" in first
    install = code[0].source
    assert "find_spec(\"nb_finetune\") is None" in install and "ipywidgets" not in install.split("\n", 2)[-1]
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def test_readme_launch_links_point_at_notebooks_that_exist():
    readme = (REPO / "README.md").read_text()
    linked = set(re.findall(r"notebooks/([\w.-]+\.ipynb)", readme))
    assert linked == {p.name for p in NOTEBOOKS}
    assert "mybinder.org/v2/gh/" in readme and "colab.research.google.com/github/" in readme


def test_binder_configuration_builds_a_cpu_image():
    """repo2docker reads the binder/ folder (no Docker needed for --no-build)."""
    reqs = (REPO / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in reqs and "+cpu" in reqs
    post = REPO / "binder" / "postBuild"
    assert post.stat().st_mode & 0o111 and "set -euo pipefail" in post.read_text()
    try:
        import repo2docker  # noqa: F401
    except ImportError:
        pytest.skip("jupyter-repo2docker is not installed")
    out = subprocess.run([sys.executable, "-m", "repo2docker", "--no-build", "--no-run", "--debug", str(REPO)],
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    assert 'pip install --no-cache-dir -r "binder/requirements.txt"' in text and "binder/postBuild" in text


def assert_ran_and_showed(nb, folder):
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    shown = " ".join(str(o.get("data", {}).get("text/plain", "")) for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert shown  # every notebook shows something: panels, tables, reports
    assert (folder / "runs").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name in SMALL], ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, smollm2_dir, nbformat):
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(SMALL[path.name],
                                                      metadata={"tags": ["injected-parameters"]}))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert_ran_and_showed(nb, tmp_path)


@pytest.mark.slow
def test_quickstart_fits_binder_memory(tmp_path, monkeypatch, smollm2_dir, nbformat):
    """With Binder's sizes (as BINDER_LAUNCH_HOST switches on), the kernel's measured peak during
    training stays under mybinder.org's 2 GB, fp32 as on Binder's CPUs; and every cell runs."""
    from nbclient import NotebookClient
    nb = nbformat.read(QUICKSTART, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("MAX_STEPS = 3\nEPOCHS = 1"))
    # Binder's CPUs have no bf16: compute in fp32 as they would (no bf16 weight copies).
    made = next(i for i, c in enumerate(nb.cells) if "studio = Studio(" in c.source)
    nb.cells.insert(made + 1, nbformat.v4.new_code_cell(
        "studio.shared.set('model.compute_dtype', 'float32')\nstudio.shared.set('eval.max_test_rows', 8)"))
    nb.cells.append(nbformat.v4.new_code_cell("print(studio.shared.current.peak_memory)"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("BINDER_LAUNCH_HOST", "https://mybinder.org/")
    # What binder/start exports before starting the server, the kernel inherits.
    exports = re.findall(r"^export (\w+)=(\S+)$", (REPO / "binder" / "start").read_text(), re.M)
    assert exports
    for name, value in exports:
        monkeypatch.setenv(name, value)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert_ran_and_showed(nb, tmp_path)
    peak = int(nb.cells[-1].outputs[0]["text"])
    print(f"kernel peak with Binder's settings: {peak / 10**9:.2f} GB")
    # 2 GB in all, and the notebook server beside the kernel takes about 0.1 GB.
    assert peak < 1.8 * 10**9, f"peak {peak / 10**9:.2f} GB"
    cfg = __import__("yaml").safe_load((tmp_path / "runs" / "quickstart" / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 1 and cfg["train"]["grad_accum"] == 8
    assert cfg["train"]["gradient_checkpointing"] == "yes"
