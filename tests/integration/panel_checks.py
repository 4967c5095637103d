"""What the browser test checks on each tab and panel, as a person would see it: every control
the panel defines is shown (or hidden on purpose, and shown after the choice that reveals it),
no picture is broken, and no error is printed or shown.

The notebook's first cell (TAG_CELL) walks each panel's widget tree and gives every control a
DOM class of its own, writing what it found to controls-NAME.json; the test reads that file and
looks for each class on the page. The package itself is left as it is. Clicking, choosing,
waiting and finding broken pictures and error boxes: docs/browser_lab.py, as for the screenshots.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import browser_lab

# Run in the kernel. A control is what a person uses (buttons, boxes, choices); HTML, pictures
# and progress bars only show things. `orphans` are controls a panel keeps as attributes but
# never puts in its widget tree, so that nobody can see them.
TAG_CELL = '''\
import json
from pathlib import Path

import ipywidgets as W
from nb_finetune import ui

SHOWS = (W.HTML, W.HTMLMath, W.Label, W.Image, W.IntProgress, W.FloatProgress)
tagged = {}


def is_control(widget):
    return isinstance(widget, (W.Button, W.ValueWidget)) and not isinstance(widget, SHOWS)


def tag(widget, where, hidden, found):
    hidden = hidden or widget.layout.display == "none"
    if is_control(widget):
        tagged[id(widget)] = name = f"nbft-c{len(tagged)}"
        widget.add_class(name)
        found.append(dict(where, cls=name, kind=type(widget).__name__, description=widget.description,
                          hidden=hidden))
    for i, child in enumerate(getattr(widget, "children", ())):
        inner = dict(where)
        if isinstance(widget, W.Tab):
            inner["tab"] = widget.get_title(i)
        elif isinstance(widget, W.Accordion):
            widget.add_class(f"nbft-a{id(widget)}")
            inner.update(accordion=f"nbft-a{id(widget)}", section=i, title=widget.get_title(i))
        tag(child, inner, hidden, found)


def defined(panel):
    """The controls a panel keeps: its attributes and its forms' fields."""
    for name, value in vars(panel).items():
        if is_control(value):
            yield f"{type(panel).__name__}.{name}", value
    for form in getattr(panel, "forms", []):
        for key, control in form.controls.items():
            yield f"{type(panel).__name__} {key}", control


def show(name, widget):
    found = []
    tag(widget, {}, False, found)
    orphans = [label for panel in getattr(widget, "panels", [widget]) for label, control in defined(panel)
               if id(control) not in tagged]
    widget.add_class(f"nbft-show-{name}")
    Path(f"controls-{name}.json").write_text(json.dumps({"controls": found, "orphans": orphans}))
    return widget
'''

# Controls hidden on purpose: the choice that shows each (the control making it, the option).
TEMPLATES = ("probe", "completions from templates")
REVEALED_BY = {"templates": TEMPLATES, "groups (comma)": TEMPLATES, "scorer": TEMPLATES,
               "words to flag": TEMPLATES, "samples per prompt": TEMPLATES, "block words": TEMPLATES,
               "path": ("probe", "CrowS-Pairs CSV file (path below)")}


def controls(root: Path, name: str) -> dict:
    return json.loads((root / f"controls-{name}.json").read_text())


def label(control: dict) -> str:
    where = " / ".join(str(control[k]) for k in ("tab", "title") if k in control)
    return f"{control['kind']} '{control['description']}'" + (f" ({where})" if where else "")


def open_section(scope, control: dict) -> None:
    """Open the accordion section the control sits in, as a person clicks its header."""
    header = scope.locator(f".{control['accordion']} .jupyter-widget-Collapse-header").nth(control["section"])
    header.click()


def visible(scope, control: dict, timeout: float = 5) -> bool:
    """Whether the control shows; a moment is left for the front end to apply a change."""
    return bool(browser_lab.wait_until(scope.locator(f".{control['cls']}").is_visible, timeout, 0.1))


def check_shown(scope, group: list[dict], problems: list[str]) -> None:
    """The controls shown from the start, section by section (one accordion section is open at a time)."""
    for control in sorted((c for c in group if not c["hidden"]), key=lambda c: (c.get("accordion", ""),
                                                                               c.get("section", -1))):
        if "accordion" in control and not scope.locator(f".{control['cls']}").is_visible():
            open_section(scope, control)
        if not visible(scope, control):
            problems.append(f"{label(control)} is not visible")


def check_revealed(scope, group: list[dict], problems: list[str]) -> None:
    """The controls hidden at first: each shows after the choice that reveals it."""
    for control in (c for c in group if c["hidden"]):
        if control["description"] not in REVEALED_BY:
            problems.append(f"{label(control)} is hidden and no known choice shows it")
            continue
        browser_lab.choose(scope, *REVEALED_BY[control["description"]])
        if not visible(scope, control):
            problems.append(f"{label(control)} stays hidden after choosing "
                            f"{REVEALED_BY[control['description']][1]!r}")


def check_pictures_and_errors(scope, where: str, problems: list[str]) -> None:
    broken = [i for i in browser_lab.pictures(scope, 15) if i["complete"] and i["width"] == 0]
    if broken:
        problems.append(f"{where}: {len(broken)} broken picture(s) (classes {[i['cls'] for i in broken]})")
    boxes = browser_lab.error_boxes(scope)
    if boxes.count():
        problems.append(f"{where}: shows an error: {boxes.first.inner_text()[:500]}")


def check_panel(scope, found: dict, where: str, problems: list[str]) -> None:
    """Every tab of a studio (or the panel alone): its controls, pictures and errors."""
    problems += [f"{where}: {orphan} is defined but not in the widget tree" for orphan in found["orphans"]]
    tabs = list(dict.fromkeys(c.get("tab") for c in found["controls"]))
    for tab in tabs:
        group = [c for c in found["controls"] if c.get("tab") == tab]
        if tab is not None:
            browser_lab.click_tab(scope, tab)
        scope.scroll_into_view_if_needed()  # a cell out of view may be left unrendered
        here = f"{where} / {tab}" if tab else where
        before = len(problems)
        check_shown(scope, group, problems)
        check_revealed(scope, group, problems)
        check_pictures_and_errors(scope, here, problems)
        problems[before:] = [p if p.startswith(where) else f"{here}: {p}" for p in problems[before:]]


def printed_outputs(page) -> list[str]:
    """Text in any cell's output (stdout, stderr, a traceback), and widgets the page could not
    draw: panels never print. The rendered text is the output element itself, not inside it.
    textContent, not innerText: a cell scrolled out of view may have no layout, and no innerText."""
    return page.evaluate("Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell')).flatMap((cell, i) =>"
                         " Array.from(cell.querySelectorAll('.jp-OutputArea-output')).filter(e =>"
                         " e.matches('.jp-RenderedText') || e.querySelector('.jp-RenderedText')"
                         " || e.textContent.includes('Error displaying widget')).map(e => `cell ${i} `"
                         " + (e.getAttribute('data-mime-type') || 'output') + ': ' + e.textContent.slice(0, 2000)))")
