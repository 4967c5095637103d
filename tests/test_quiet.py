"""Library notices are quieted before the library that prints them is imported, and for the
work a front end starts; everything is put back after."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import SUBPROCESS_ENV

# Records the bitsandbytes logger's level at the moment bitsandbytes is first imported.
WATCH = textwrap.dedent("""
    import logging, sys
    class Watch:
        def find_spec(self, name, path=None, target=None):
            if name == "bitsandbytes":
                print("level", logging.getLogger("bitsandbytes").getEffectiveLevel())
    sys.meta_path.insert(0, Watch())
    {front_end}
    print("imported", "bitsandbytes" in sys.modules)
    print("after", logging.getLogger("bitsandbytes").level)
""")


@pytest.mark.slow  # a fresh interpreter per case, importing the whole stack
@pytest.mark.parametrize("front_end", ["import nb_finetune.ui", "import nb_finetune; nb_finetune.Session"])
def test_bitsandbytes_is_quiet_from_the_moment_it_loads(front_end):
    """It warns while being imported on some CPUs (optional kernels it cannot fetch); a
    notebook cell that imports the panels must not show that."""
    done = subprocess.run([sys.executable, "-c", WATCH.format(front_end=front_end)], capture_output=True, text=True,
                          env=SUBPROCESS_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")
    assert "imported True" in lines  # peft imports it, so the watch saw the import
    assert "level 40" in lines  # logging.ERROR, already set
    assert "after 0" in lines  # and back to what it was (NOTSET) once the import is done


def test_work_is_quiet_and_everything_is_put_back_after_the_last_piece_of_work():
    """A training thread and a panel's click overlap: the first in quiets, the last out restores."""
    import logging
    import threading
    import warnings

    import transformers

    from nb_finetune.quiet import quieted
    before = (list(warnings.filters), transformers.logging.get_verbosity(),
              transformers.logging.is_progress_bar_enabled(), logging.getLogger("bitsandbytes").level)
    inside, done = threading.Event(), threading.Event()

    def training():
        with quieted():
            inside.set()
            done.wait(30)

    thread = threading.Thread(target=training)
    thread.start()
    inside.wait(30)
    with quieted():
        assert transformers.logging.get_verbosity() == logging.ERROR
        assert not transformers.logging.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)  # named: filtered
            warnings.warn("a warning of its own", UserWarning, stacklevel=1)  # any other: still shown
        assert [str(w.message) for w in caught] == ["a warning of its own"]
    assert transformers.logging.get_verbosity() == logging.ERROR  # the thread's work still runs
    done.set()
    thread.join(30)
    after = (list(warnings.filters), transformers.logging.get_verbosity(),
             transformers.logging.is_progress_bar_enabled(), logging.getLogger("bitsandbytes").level)
    assert after == before


def test_the_command_line_leaves_warnings_alone(capsys):
    """No blanket 'ignore': a command changes no warning filter."""
    import warnings

    from nb_finetune.cli import main
    before = list(warnings.filters)
    assert main(["presets"]) == 0
    assert warnings.filters == before
