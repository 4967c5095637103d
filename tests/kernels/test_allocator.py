"""The allocator settings for CPU training, each in a fresh process (glibc's settings and
torch's huge-page choice last for the process): freed memory kept inside the context and
given back after, and huge pages for torch's large tensors where the command line asks."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
from conftest import SUBPROCESS_ENV

from nb_finetune.kernels.allocator import THP_SETTING, huge_pages_for_tensors

# glibc's own settings, as a user's machine has them (Binder's start script sets its own).
PLAIN_ENV = {k: v for k, v in SUBPROCESS_ENV.items() if not k.startswith("MALLOC_")}

KEPT = textwrap.dedent("""
    import json, sys
    import psutil, torch
    from nb_finetune.kernels.allocator import freed_memory_kept
    rss = lambda: psutil.Process().memory_info().rss
    with freed_memory_kept(sys.argv[1] == "on") as kept:
        # 1 GB written, as a step's activations: 16 MB blocks and 48 MB ones (above glibc's
        # 32 MB mmap ceiling, as the fp32 loss chunks are)
        blocks = [torch.ones(2 ** 22 * (1 + 2 * (i % 2))) for i in range(32)]
        held = rss()
        del blocks
        freed = rss()
    print(json.dumps({"kept": kept, "held": held, "freed": freed, "after": rss()}))
""")


@pytest.mark.slow  # a fresh process per case, training
@pytest.mark.parametrize("how", ["on", "off", "binder"])
def test_freed_memory_is_kept_while_training_and_given_back_after(how):
    """1 GB freed inside the context stays for the next step to reuse, and is returned when it
    ends; off, or under Binder's own allocator settings, glibc returns it at once."""
    env = PLAIN_ENV | ({"MALLOC_MMAP_THRESHOLD_": "131072"} if how == "binder" else {})
    proc = subprocess.run([sys.executable, "-c", KEPT, "off" if how == "off" else "on"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = 2 ** 30
    if platform.libc_ver()[0] != "glibc":  # another allocator: nothing to set
        assert not got["kept"]
        return
    assert got["kept"] == (how == "on"), got
    if how == "on":
        assert got["held"] - got["freed"] < 0.1 * gb, got   # kept
    else:
        assert got["held"] - got["freed"] > 0.9 * gb, got   # returned at once
    assert got["held"] - got["after"] > 0.9 * gb, got       # and after, given back either way


# The command line's set-up of its process with the given train.cpu_kernels, or only an import
# of the package; then torch allocates for the first time.
HUGE = textwrap.dedent("""
    import json, os, sys
    how = sys.argv[1]
    if how == "import":
        import nb_finetune  # noqa: F401
    else:
        from nb_finetune import cli, load_preset
        cli.set_up_process(load_preset("demo").with_overrides({"train.cpu_kernels": how}))
    import torch
    from nb_finetune.kernels.allocator import resident_bytes
    x = torch.ones(64 * 2**20)  # 256 MB, written
    print(json.dumps({"setting": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge": resident_bytes("AnonHugePages")}))
""")


def _huge_pages_offered() -> str:
    try:
        with open(THP_SETTING) as f:
            return f.read().split("[")[1].split("]")[0]  # always, madvise or never
    except (OSError, IndexError):
        return "never"


@pytest.mark.slow  # a fresh process per case
@pytest.mark.parametrize("how", ["command line", "kernels off", "import only", "turned off", "binder"])
def test_large_tensors_sit_on_huge_pages_where_the_command_line_trains_with_the_kernels(how):
    """The command line with train.cpu_kernels auto puts torch's large CPU tensors on
    transparent huge pages where the kernel gives them on request; with the kernels off, or
    only importing nb_finetune (a notebook), or with THP_MEM_ALLOC_ENABLE=0 or Binder's
    allocator settings, they stay on 4 KB pages."""
    env = {k: v for k, v in PLAIN_ENV.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env |= {"turned off": {"THP_MEM_ALLOC_ENABLE": "0"}, "binder": {"MALLOC_MMAP_THRESHOLD_": "131072"}}.get(how, {})
    mode = {"kernels off": "off", "import only": "import"}.get(how, "auto")
    proc = subprocess.run([sys.executable, "-c", HUGE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    offered = _huge_pages_offered()
    if offered == "never":
        assert got["setting"] == ("0" if how == "turned off" else None), got
        return
    assert got["setting"] == {"command line": "1", "turned off": "0"}.get(how), got
    if how == "command line":
        assert got["huge"] > 200 * 2 ** 20, got   # most of the 256 MB
    elif offered == "madvise":                    # ("always" gives huge pages whatever torch asks)
        assert got["huge"] < 16 * 2 ** 20, got


def test_huge_pages_only_where_the_kernel_offers_them(tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert not huge_pages_for_tensors(str(setting))
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert not huge_pages_for_tensors(str(tmp_path / "missing"))  # not Linux
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    setting.write_text("always [madvise] never\n")
    assert huge_pages_for_tensors(str(setting))
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
