"""IPython extension: `%load_ext nb_finetune`, the `%finetune` line magic and the
`%%finetune_config` cell magic.

The magics share one `Shared` (settings + session) per shell, so a config cell changes what
the panels shown afterwards (and those already shown) edit. Without a widget front end (a
plain IPython terminal) each subcommand answers in text instead of showing a panel.
"""
from __future__ import annotations

import html
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from .commands import BY_NAME, magic_usage
from .config import RunConfig
from .errors import ConfigError, UserError
from .redact import redact


@dataclass
class Table:
    """Rows of (what, found, meaning) shown as an HTML table or as text."""
    title: str
    rows: list

    def _repr_html_(self) -> str:
        body = "".join("<tr>" + "".join(f"<td>{html.escape(redact(str(c)))}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        return (f"<b>{html.escape(self.title)}</b><table class='nbft-table' style='border-collapse:collapse'>"
                f"{body}</table>")

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))

    def __str__(self) -> str:
        width = max((len(str(r[0])) for r in self.rows), default=0)
        return self.title + "\n" + "\n".join(f"  {str(r[0]):<{width}}  " + "  ".join(map(str, r[1:]))
                                             for r in self.rows)


@dataclass
class ConfigCheck:
    """A config cell with each problem written beside the line of its field."""
    text: str
    problems: list

    def _lines(self):
        section, marked = None, []
        by_field = {p.field: p for p in self.problems}
        for line in self.text.splitlines():
            stripped = line.strip()
            key = stripped.split(":", 1)[0].strip() if ":" in stripped and not stripped.startswith("#") else ""
            if key and not line[:1].isspace():
                section = key
            name = key if not line[:1].isspace() else f"{section}.{key}"
            problem = by_field.pop(name, None)
            marked.append((line, problem))
        return marked, list(by_field.values())

    def _repr_html_(self) -> str:
        marked, rest = self._lines()
        rows = []
        for line, p in marked:
            note = (f"<span style='color:#b00020'>&#9888; {html.escape(redact(p.accepted))}</span>" if p else "")
            rows.append(f"<tr><td><pre style='margin:0'>{html.escape(redact(line)) or ' '}</pre></td>"
                        f"<td>{note}</td></tr>")
        extra = "".join(f"<li>{html.escape(redact(str(p)))}</li>" for p in rest)
        n = len(self.problems)
        return (f"<div style='color:#b00020'><b>{n} problem{'s' if n != 1 else ''} in the config</b></div>"
                f"<table>{''.join(rows)}</table>" + (f"<ul>{extra}</ul>" if extra else ""))

    def __str__(self) -> str:
        marked, rest = self._lines()
        width = max((len(line) for line, _ in marked), default=0)
        out = [f"{line:<{width}}  <-- {p.accepted}" if p else line for line, p in marked]
        return "\n".join(out + [f"{p}" for p in rest])

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(str(self))


def front_end(shell) -> str:
    if "google.colab" in sys.modules:
        return "Colab"
    if any(k.startswith("VSCODE_") for k in os.environ):
        return "VS Code"
    if getattr(shell, "kernel", None) is None:
        return "IPython terminal"
    try:
        import psutil
        parents = " ".join(" ".join(p.cmdline()) for p in psutil.Process().parents())
    except Exception:  # noqa: BLE001 - unknown is an answer too
        parents = ""
    if "jupyter-lab" in parents or "jupyterlab" in parents:
        return "JupyterLab"
    if "notebook" in parents:
        return "Jupyter Notebook"
    return "Jupyter kernel (front end not known)"


def environment(shell) -> Table:
    import ipywidgets

    from . import assets, hardware
    where = front_end(shell)
    meaning = {"Colab": "training runs in the foreground: interrupt the cell to stop (what was trained is kept); "
                        "keep Colab's ipywidgets 7.7",
               "IPython terminal": "no widgets here: subcommands answer in text; training runs headless",
               }.get(where, "training runs in the background: the Stop button works while it runs")
    rows = [("front end", where, meaning),
            ("ipywidgets", ipywidgets.__version__, "7.7 and 8.x are supported")]
    for i, gpu in enumerate(hardware.gpus()):
        rows.append((f"GPU {i}", gpu, "QLoRA (4-bit) and bf16/fp16 training on the GPU"))
    if not hardware.cuda_available():
        rows.append(("GPU", "none", f"training runs on the CPU ({os.cpu_count()} cores); keep models small "
                                    "(SmolLM2-135M trains at a few hundred tokens/s)"))
    bf16 = hardware.bf16_supported()
    rows.append(("bf16", "yes" if bf16 else "no", "bf16 autocast: faster, half the activation memory" if bf16
                 else "float32 arithmetic (or fp16 on a GPU)"))
    ok, why = hardware.bitsandbytes_available()
    rows.append(("bitsandbytes", "yes" if ok else "no", "4-bit / 8-bit base models (QLoRA) available" if ok
                 else why))
    cache = assets.cache_dir()
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
    rows.append(("asset cache", f"{cache} ({size / 2**20:,.0f} MB)",
                 "built-in models and data are fetched here once; set NB_FINETUNE_CACHE to move it"))
    rows.append(("Hugging Face Hub", "reachable" if hardware.hub_reachable() else "not reachable",
                 "Hub ids work" if hardware.hub_reachable() else "use built-in names or local paths"))
    return Table("nb_finetune environment", rows)


@magics_class
class FinetuneMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self._shared = None
        # None: decide by the front end (a kernel has widgets, a terminal has not).
        self.widgets: bool | None = None

    @property
    def shared(self):
        if self._shared is None:
            from .ui.common import Shared
            self._shared = Shared()
        return self._shared

    def _has_widgets(self) -> bool:
        return self.widgets if self.widgets is not None else getattr(self.shell, "kernel", None) is not None

    @line_magic
    def finetune(self, line: str):
        """%finetune SUBCOMMAND: panels and engine steps; `%finetune help` lists them."""
        try:
            args = shlex.split(line)
        except ValueError as err:
            raise UsageError(f"%finetune {line}: {err}") from None
        command, rest = (args[0], args[1:]) if args else ("help", [])
        if command == "help":
            print(magic_usage())
            return None
        if command not in BY_NAME or BY_NAME[command].magic is None:
            raise UsageError(f"%finetune: unknown subcommand {command!r}\n{magic_usage()}")
        from .quiet import quieted
        try:
            with quieted():
                from .pipeline import reporting_to  # quiet first: it loads bitsandbytes, which logs as it loads
                with reporting_to(print):  # the messages of work done here: the console (no panel shows them)
                    return getattr(self, f"_do_{command}")(rest)
        except UserError as err:  # a problem the user can fix: one line, no traceback
            raise UsageError(redact(str(err))) from None

    # -- subcommands ----------------------------------------------------------------------
    def _panel(self, name: str):
        from . import ui
        return getattr(ui, name)(self.shared)

    def _do_studio(self, rest):
        if not self._has_widgets():
            return self.shared.config()  # shown as text: the settings the studio would edit
        from .ui import Studio
        return Studio(shared=self.shared)

    def _do_data(self, rest):
        if rest:
            self.shared.set("data.source", rest[0])
        if not self._has_widgets():
            session = self.shared.session()
            return session.prepare_data().report
        return self._panel("DataPanel")

    def _do_preview(self, rest):
        if not self._has_widgets():
            from .data.collator import token_table
            session = self.shared.session()
            session.tokenize()
            table = token_table(session.formatter, session.prep.splits["train"].iloc[0].to_dict())
            return table
        return self._panel("TokenizationPanel")

    def _do_model(self, rest):
        return self._panel("ModelPanel") if self._has_widgets() else self.shared.config().model

    def _do_train(self, rest):
        if rest[:1] == ["--config"] and len(rest) == 2:
            self._use(RunConfig.load(rest[1]))
        elif rest:
            raise UsageError("usage: %finetune train [--config FILE]")
        if not self._has_widgets():  # a terminal: the whole job, headless, with console progress
            from . import pipeline, training
            return pipeline.run(self.shared.config(), callbacks=[training.ConsoleProgress()],
                                source=self.shared.source)
        return self._panel("TrainPanel")

    def _do_evaluate(self, rest):
        return self._panel("EvalPanel") if self._has_widgets() else self.shared.session().evaluate()

    def _do_probe(self, rest):
        if rest == ["gate"]:
            return self.shared.session().probe_bias()
        if not self._has_widgets():  # a terminal: the built-in CrowS-Pairs subset on base and tuned
            n = int(rest[0]) if rest and rest[0].isdigit() else 0
            if rest and not n:
                raise UsageError("usage: %finetune probe [N|gate]  (N: how many pairs, e.g. 200)")
            return self.shared.session().pair_set_change("crows-pairs-masked", limit=n)
        return self._panel("ProbePanel")

    def _do_export(self, rest):
        if not self._has_widgets():
            raise UsageError("exporting from a terminal: use `nb-finetune export --config FILE --output DIR`")
        return self._panel("ExportPanel")

    def _do_runs(self, rest):
        folder = rest[0] if rest else str(Path(self.shared.get("train.output_dir")).parent)
        if self._has_widgets():
            from .ui import RunsPanel
            return RunsPanel(self.shared, folder=folder)
        from . import runs
        found, _ = runs.find_runs(folder)
        return runs.table(found, found[-1] if found else None)

    def _do_config(self, rest):
        return self.shared.config()

    def _do_assets(self, rest):
        import pandas as pd

        from . import assets
        return pd.DataFrame(assets.listing())

    def _do_env(self, rest):
        return environment(self.shell)

    # -- the config cell --------------------------------------------------------------------
    def _use(self, cfg: RunConfig) -> None:
        self.shared.use(cfg)

    @cell_magic
    def finetune_config(self, line: str, cell: str):
        """%%finetune_config: a YAML config (sections data, model, train, eval) for the panels."""
        try:
            raw = yaml.safe_load(cell) or {}
        except yaml.YAMLError as err:
            raise UsageError(f"the config cell is not valid YAML: {str(err).splitlines()[0]}") from None
        try:
            cfg = RunConfig.from_dict(raw)
        except ConfigError as err:
            from IPython.display import display
            display(ConfigCheck(cell, err.problems))
            n = len(err.problems)
            raise UsageError(f"{n} problem{'s' if n != 1 else ''} in the config (marked above); "
                             "nothing was changed") from None
        self._use(cfg)
        return cfg


def load(shell) -> None:
    shell.register_magics(FinetuneMagics)


def unload(shell) -> None:
    magics = shell.magics_manager.magics
    magics["line"].pop("finetune", None)
    magics["cell"].pop("finetune_config", None)
    shell.magics_manager.registry.pop("FinetuneMagics", None)
