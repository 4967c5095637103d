"""Export: the adapter, optionally a merged model or a GGUF file for llama.cpp / Ollama (checked
by reading it back), the config that `nb-finetune run --config` reproduces, and a job folder for
torchrun / accelerate."""
from __future__ import annotations

import dataclasses
import html
from pathlib import Path

import ipywidgets as widgets

from .. import export
from .common import Panel


class ExportPanel(Panel):
    title = "Export"

    def __init__(self, shared=None, config=None, data=None, **kwargs):
        super().__init__(shared, config, data, **kwargs)
        style = {"description_width": "150px"}
        self.folder = widgets.Text(value=str(Path(self.shared.get("train.output_dir")) / "export"),
                                   description="folder", style=style, layout=widgets.Layout(width="420px"))
        self.adapter = widgets.Checkbox(value=True, description="adapter (needs a trained model)", indent=False)
        self.merged = widgets.Checkbox(value=False, description="merged model (base + adapter, full size)",
                                       indent=False)
        self.job = widgets.Checkbox(value=True, description="job folder for torchrun / accelerate", indent=False)
        self.gguf = widgets.Dropdown(options=[("no", ""), ("f16 (exact)", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0")],
                                     value="", description="GGUF (llama.cpp)", style=style,
                                     tooltip="a GGUF file for llama.cpp, Ollama and LM Studio, read back to check it")
        self.force = widgets.Checkbox(value=False, description="replace an existing GGUF folder", indent=False)
        self.export_button = self.button("Export", self.export, "primary", "download")
        self.written = widgets.HTML()
        self.children = [self.folder, self.adapter, self.merged, self.job, widgets.HBox([self.gguf, self.force]),
                         widgets.HBox([self.export_button]),
                         self.status, self.error, self.warnings, self.written]

    def export(self) -> list[Path]:
        folder = Path(self.folder.value).expanduser()
        session = self.shared.current
        cfg = self.shared.config()
        written = []
        if self.shared.source is not None:
            # The config must name a file to be re-runnable: the in-memory data goes beside it.
            data_file = folder / "data.jsonl"
            folder.mkdir(parents=True, exist_ok=True)
            self.shared.source.to_json(data_file, orient="records", lines=True, force_ascii=False)
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(data_file.resolve())))
            written.append(data_file)
        written.append(cfg.save(folder / "config.yaml"))
        wants_model = self.adapter.value or self.merged.value or self.gguf.value
        trained = session is not None and session.train_result is not None and session.model is not None
        if wants_model and not trained:
            self._list(written)
            self.show_error("no trained model to export yet: train one first (the config was saved)")
            return written
        if self.adapter.value:
            self.say("saving the adapter")
            written.append(export.save_adapter(session.model, session.tokenizer, folder / "adapter"))
        if self.merged.value:
            written.append(export.save_merged(session.cfg, session.train_result.adapter_dir, folder / "merged",
                                              session.objective, session.prep.labels, self.say))
        if self.job.value:
            written.append(export.export_job(cfg, folder / "job"))
        checked = ""
        if self.gguf.value:
            result = export.export_gguf(session.cfg, session.train_result.adapter_dir, folder / f"gguf-{self.gguf.value}",
                                        self.gguf.value, force=self.force.value, progress=self.say)
            written += [result.gguf, result.modelfile]
            checked = result.roundtrip.summary() + "; "
        self._list(written)
        self.say(f"{checked}exported to {folder}; re-run with: nb-finetune run --config {folder / 'config.yaml'}")
        return written

    def _list(self, paths: list[Path]) -> None:
        self.written.value = "<b>written</b><ul>" + "".join(f"<li><code>{html.escape(shown(p))}</code></li>"
                                                            for p in paths) + "</ul>"


def shown(path: Path) -> str:
    """A written path as the folder box names it: relative to the notebook's folder where inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
