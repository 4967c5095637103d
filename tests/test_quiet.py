"""Library notices are quieted before the library that prints them is imported."""
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
""")


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
