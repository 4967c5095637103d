"""What every panel shares: the settings being edited, the session, forms built from the
config dataclasses' field metadata, and one way of running a button's work and showing
its errors in the panel itself.

Only widgets common to ipywidgets 7.7 (what Colab ships) and 8.x are used.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import html
import json
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as widgets
import yaml

from .. import config as config_mod
from ..config import RunConfig
from ..errors import ConfigError, Problem, UserError
from ..pipeline import Session, reporting_to
from ..quiet import quieted
from ..redact import redact
from ..render.figures import to_png

LABEL_WIDTH = "150px"


def on_colab() -> bool:
    """Colab's front end drops widget updates sent from a background thread."""
    return "google.colab" in sys.modules


def as_config(config) -> RunConfig:
    """A RunConfig from a RunConfig, a dict, a preset name or a YAML/JSON path; None: the demo."""
    if config is None:
        return config_mod.load_preset("demo")
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return RunConfig.from_dict(config)
    if isinstance(config, (str, Path)) and str(config) in config_mod.presets():
        return config_mod.load_preset(str(config))
    return RunConfig.load(config)


class Shared:
    """The settings the panels edit (a plain dict, validated on demand), an optional in-memory
    data source, and one `Session` whose stage results the panels show.

    Panels call `observe(fn)` to hear `fn(event)`: 'config' after a setting changed, and
    'data', 'tokens', 'train', 'eval' after a stage produced a result, and 'resume' when the
    settings to resume a stopped run have been loaded (the Runs panel)."""

    def __init__(self, config=None, source=None):
        self.raw = as_config(config).to_dict()
        self.source = source
        self._source_changed = False
        self._session: Session | None = None
        self._listeners = []
        self.busy = False  # a run is using the session: new settings wait for the next one
        self._problems: list[Problem] | None = None  # validated once per change, read by every form

    # -- settings -------------------------------------------------------------------------
    def get(self, key: str):
        section, name = key.split(".")
        return self.raw[section][name]

    def set(self, key: str, value) -> None:
        section, name = key.split(".")
        value = config_mod.as_choice(_field(key), value)  # True/False for an on/off field: the word
        if self.raw[section][name] != value:
            self.raw[section][name] = value
            self.notify("config")

    def use(self, config) -> None:
        """Replace every setting (a RunConfig, dict, preset name or path); panels follow."""
        self.raw = as_config(config).to_dict()
        self.notify("config")

    def set_source(self, source) -> None:
        self.source, self._source_changed = source, True
        self.notify("config")

    def config(self) -> RunConfig:
        """The current settings as a validated RunConfig; raises ConfigError with every problem."""
        return RunConfig.from_dict(copy.deepcopy(self.raw))

    def problems(self) -> list[Problem]:
        if self._problems is None:
            try:
                self.config()
                self._problems = []
            except ConfigError as err:
                self._problems = err.problems
        return self._problems

    # -- session --------------------------------------------------------------------------
    def session(self) -> Session:
        """The session, brought up to date with the current settings (stale results dropped)."""
        if self.busy and self._session is not None:
            return self._session
        cfg = self.config()
        if self._session is None:
            self._session = Session(cfg)
            self._session.source = self.source
        else:
            if self._source_changed:
                self._session.source = self.source
            self._session.reconfigure(cfg, source_changed=self._source_changed)
        self._source_changed = False
        return self._session

    @property
    def current(self) -> Session | None:
        """The session as it is, without applying new settings (for reading results)."""
        return self._session

    # -- events ---------------------------------------------------------------------------
    def observe(self, fn) -> None:
        self._listeners.append(fn)

    def notify(self, event: str) -> None:
        if event == "config":
            self._problems = None
        for fn in list(self._listeners):
            fn(event)


def _tooltip(widget, text: str) -> None:
    # ipywidgets 8 renamed description_tooltip to tooltip; set whichever this version syncs.
    if "tooltip" in widget.keys:
        widget.tooltip = text
    else:
        widget.description_tooltip = text


@functools.cache
def _field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    klass = type(getattr(RunConfig(), section))
    return {f.name: f for f in dataclasses.fields(klass)}[name]


class Form:
    """Controls for some config fields, bound to `shared`: a change is written back at once,
    and every problem with the settings is shown beside its field."""

    def __init__(self, shared: Shared, keys: list[str], label_width: str = LABEL_WIDTH,
                 suggestions: dict | None = None):
        self.shared = shared
        self.suggestions = suggestions or {}  # key -> names offered for a free-text field
        self.controls: dict[str, widgets.Widget] = {}
        self.errors: dict[str, widgets.HTML] = {}
        self.notes: dict[str, widgets.HTML] = {}
        rows = []
        for key in keys:
            control = self._control(key, label_width)
            self.controls[key] = control
            self.errors[key] = widgets.HTML(layout=widgets.Layout(margin="0 0 0 8px"))
            self.notes[key] = widgets.HTML(layout=widgets.Layout(margin="0 0 0 8px"))
            control.observe(lambda change, k=key: self._changed(k), names="value")
            rows.append(widgets.HBox([control, self.errors[key], self.notes[key]]))
        self.widget = widgets.VBox(rows)
        self._syncing = False
        shared.observe(self._on_event)

    def _control(self, key: str, label_width: str) -> widgets.Widget:
        f = _field(key)
        value = self.shared.get(key)
        kind = config_mod.field_type(f)
        common = {"description": key.split(".")[1], "style": {"description_width": label_width},
                  "layout": widgets.Layout(width="420px")}
        # Text is read when the user presses Enter or leaves the box, not at every keystroke:
        # each change re-validates and may redraw previews and estimates.
        text = {"continuous_update": False}
        if f.metadata.get("choices"):
            w = widgets.Dropdown(options=list(f.metadata["choices"]), value=value, **common)
        elif kind is bool:
            w = widgets.Checkbox(value=value, indent=True, **common)
        elif kind is int:
            w = widgets.IntText(value=value, **common)
        elif kind is float:
            w = widgets.FloatText(value=value, **common)
        elif kind in (dict, list):
            w = widgets.Text(value=json.dumps(value) if value else "", placeholder="{}" if kind is dict else "[]",
                             **common, **text)
        elif key in self.suggestions:
            w = widgets.Combobox(value=str(value), options=list(self.suggestions[key]), ensure_option=False,
                                 **common, **text)
        else:
            w = widgets.Text(value=str(value), **common, **text)
        _tooltip(w, f.metadata.get("help", ""))
        return w

    def _read(self, key: str):
        value = self.controls[key].value
        kind = config_mod.field_type(_field(key))
        if kind in (dict, list):
            text = value.strip()
            if not text:
                return kind()
            try:  # YAML reads JSON too, and {0: negative} without quotes
                return yaml.safe_load(text)
            except yaml.YAMLError:
                return text  # kept as typed, so validation names it
        return value

    def _changed(self, key: str) -> None:
        if self._syncing:
            return
        self.shared.set(key, self._read(key))

    def _on_event(self, event: str) -> None:
        if event != "config":
            return
        # Another panel may have changed a field shown here too (max_length, say).
        self._syncing = True
        try:
            for key, control in self.controls.items():
                value = self.shared.get(key)
                if self._read(key) != value:
                    structured = config_mod.field_type(_field(key)) in (dict, list)
                    control.value = (json.dumps(value) if value else "") if structured else value
        finally:
            self._syncing = False
        self.show_problems(self.shared.problems())

    def show_problems(self, problems: list[Problem]) -> list[Problem]:
        """Mark each field with its problem; returns the problems of fields not in this form."""
        by_key = {p.field: p for p in problems}
        for key, label in self.errors.items():
            p = by_key.get(key)
            label.value = "" if p is None else (f"<span style='color:#b00020'>&#9888; "
                                                f"{html.escape(redact(p.accepted))}</span>")
        return [p for p in problems if p.field not in self.controls]

    def disable(self, key: str, reason: str) -> None:
        """A control that cannot work here: disabled, with the reason beside it."""
        self.controls[key].disabled = True
        self.notes[key].value = f"<span style='color:#666'>{html.escape(reason)}</span>"


class Picture(widgets.VBox):
    """A figure's place in a panel: a one-line hint of what will appear until there is a
    picture (an empty Image shows in the browser as a broken-picture icon), then the picture
    at its own pixel size. `clear()` goes back to the hint."""

    def __init__(self, hint: str, **kwargs):
        self.hint = widgets.HTML(f"<span style='color:#888'>{html.escape(hint)}</span>")
        self.image = widgets.Image(format="png", layout=widgets.Layout(display="none"))
        # Start, not stretch: a stretched picture is drawn wider or taller than its pixels.
        kwargs.setdefault("layout", widgets.Layout(align_items="flex-start"))
        super().__init__([self.hint, self.image], **kwargs)

    @property
    def value(self) -> bytes:
        """The PNG shown; empty while the hint is."""
        return bytes(self.image.value)

    @property
    def shown(self) -> bool:
        return self.image.layout.display != "none"

    def show(self, fig) -> None:
        self.show_png(to_png(fig))

    def show_png(self, png: bytes) -> None:
        # The width attribute keeps front ends from stretching a small picture to the panel's width.
        self.image.width = str(int.from_bytes(png[16:20], "big"))  # PNG header: width at bytes 16-19
        self.image.value = png
        self.image.layout.display = ""
        self.hint.layout.display = "none"

    def clear(self) -> None:
        self.image.layout.display = "none"
        self.hint.layout.display = ""
        self.image.value = b""


def message_html(text: str, kind: str = "error", details: str = "") -> str:
    colors = {"error": ("#b00020", "#fdecea"), "info": ("#1b4332", "#e9f5ee"), "warning": ("#7a4f01", "#fff3cd")}
    fg, bg = colors[kind]
    body = html.escape(redact(text))
    more = (f"<details><summary>details</summary><pre style='font-size:11px'>{html.escape(redact(details))}"
            "</pre></details>") if details else ""
    # The class lets a page (docs/browser_lab.py's ERROR_BOX) find an error box whatever its style.
    return (f"<div class='nbft-message nbft-{kind}-box' style='color:{fg};background:{bg};padding:4px 8px;"
            f"border-radius:4px'>{body}{more}</div>")


class Panel(widgets.VBox):
    """A panel is a VBox over a `Shared`; pass one to chain panels, or none to use it alone.
    Status lines and errors appear in the panel's own widgets (never printed)."""

    title = ""

    def __init__(self, shared: Shared | None = None, config=None, data=None, **kwargs):
        super().__init__(**kwargs)
        self.shared = shared or Shared(config, data)
        self.status = widgets.HTML()
        self.status.add_class(f"nbft-{type(self).__name__.lower()}-status")  # for a page to find it
        self.error = widgets.HTML()
        self.warnings = widgets.HTML()

    def say(self, text: str) -> None:
        self.status.value = f"<span style='color:#444'>{html.escape(redact(text))}</span>"

    def show_error(self, text: str, details: str = "") -> None:
        self.error.value = message_html(text, "error", details) if text else ""

    def handle(self, err: BaseException) -> None:
        """Show an error in this panel: a fixable one in one line, anything else with its traceback."""
        if isinstance(err, ConfigError):
            self.show_error(str(err))
            for form in getattr(self, "forms", []):
                form.show_problems(err.problems)
        elif isinstance(err, UserError):
            self.show_error(str(err))
        else:
            self.show_error(f"{type(err).__name__}: {err}",
                            "".join(traceback.format_exception(type(err), err, err.__traceback__)))

    def run_action(self, button: widgets.Button | None, fn, *args):
        """Run a button's work: the button is disabled meanwhile and re-enabled after; an error
        is shown here instead of being lost in the kernel log."""
        if button is not None:
            button.disabled = True
        self.show_error("")
        caught: list = []
        try:
            with self.working() as caught:
                return fn(*args)
        except Exception as err:  # noqa: BLE001 - every error belongs in the panel
            self.handle(err)
        finally:
            if button is not None:
                button.disabled = False
            self.show_warnings(caught)

    @contextmanager
    def working(self):
        """The context of this panel's work: the libraries quiet, the session's messages on this
        panel's status line (on this thread only: another panel's work keeps its own), and
        warnings recorded; yields the list they are recorded in."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quieted(), reporting_to(self.say):
                yield caught

    def show_warnings(self, caught) -> None:
        """Warnings raised during a panel's work, kept in the panel instead of printed."""
        texts = list(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught or []))
        if texts:
            items = "".join(f"<li>{html.escape(redact(t))}</li>" for t in texts[:20])
            self.warnings.value = (f"<details><summary style='color:#666'>{len(texts)} warning(s)</summary>"
                                   f"<ul style='font-size:11px'>{items}</ul></details>")

    def button(self, description: str, fn, style: str = "", icon: str = "",
               waits: widgets.Button | None = None) -> widgets.Button:
        """A button running `fn`; `waits` is the button disabled meanwhile (default: this one),
        for a button whose own state its work sets."""
        b = widgets.Button(description=description, button_style=style, icon=icon,
                           layout=widgets.Layout(width="auto"))
        b.on_click(lambda btn: self.run_action(waits or btn, fn))
        return b

    def session(self) -> Session:
        """The shared session; its messages reach this panel inside `working()`."""
        return self.shared.session()
