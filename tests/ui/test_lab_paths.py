"""The browser harness's JupyterLab finds the widgets' front end from whatever Python runs the
tests: in a venv made with --system-site-packages, Jupyter looks for extensions under the venv's
prefix only, while the widgets' extension was installed under the base Python's."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from conftest import browser_lab


def test_lab_data_paths_hold_the_widget_manager(monkeypatch):
    if importlib.util.find_spec("jupyterlab_widgets") is None or importlib.util.find_spec("jupyter_core") is None:
        pytest.skip("jupyterlab_widgets is not installed")
    from jupyter_core.paths import jupyter_path
    monkeypatch.setenv("JUPYTER_PATH", browser_lab.data_paths(os.environ))
    found = [d for d in jupyter_path("labextensions")
             if (Path(d) / "@jupyter-widgets" / "jupyterlab-manager" / "package.json").is_file()]
    assert found, jupyter_path("labextensions")


def test_lab_data_paths_keep_what_the_caller_named():
    paths = browser_lab.data_paths({"JUPYTER_PATH": "/opt/mine"}).split(os.pathsep)
    assert paths[0] == "/opt/mine" and str(Path(browser_lab.sys.base_prefix) / "share" / "jupyter") in paths
