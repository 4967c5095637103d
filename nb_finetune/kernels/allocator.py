"""Allocator settings for CPU training: freed memory kept between steps, and huge pages for
torch's large CPU tensors."""
from __future__ import annotations

import os
from contextlib import contextmanager

# glibc's mallopt parameters (malloc.h) and its defaults.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM, _DEFAULT_MMAPS = 128 * 1024, 65536
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20   # the largest glibc accepts on 64-bit
_NO_TRIM = -1                        # mallopt(3): -1 turns trimming off


def _glibc():
    import ctypes
    import ctypes.util
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def allocator_tuned_by_environment() -> bool:
    """Whether MALLOC_* variables tune glibc on purpose (Binder's start script does, to fit in
    2 GB): then neither freed_memory_kept nor huge_pages_for_tensors changes anything."""
    return any(k.startswith("MALLOC_") for k in os.environ)


def resident_bytes(kind: str) -> int | None:
    """This process's resident memory of one kind, as /proc/self/smaps_rollup names it
    ("Anonymous": its own, not file pages; "AnonHugePages": on transparent huge pages);
    None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith(kind + ":"))
    except OSError:
        return None


@contextmanager
def freed_memory_kept(enabled: bool = True):
    """Keep the memory a step frees for the next step, then give it back (around training and
    evaluation on a CPU).

    A CPU training step allocates and frees several GB of activations (an evaluation batch
    less, but batch after batch). With glibc's defaults much of that goes back to the system
    when freed (blocks above its mmap threshold are unmapped, and the top of the heap is
    trimmed), so the next step touches fresh pages and the kernel zero-fills every one (a
    page fault each). Here every block comes from the heap
    (none is mapped on its own; a thread's arena still maps what exceeds its 64 MB heaps) and
    the heap is not trimmed meanwhile.
    Afterwards mapping and trimming are restored, with the threshold left at glibc's own
    ceiling of 32 MB, and the free memory is returned (malloc_trim): glibc's defaults had left
    the process holding nearly all of training's peak after it ended.

    Does nothing where the allocator is not glibc's, or where MALLOC_* variables already tune
    it (Binder's start script sets a low threshold on purpose, to fit in 2 GB)."""
    libc = _glibc() if enabled and not allocator_tuned_by_environment() else None
    if libc is None:
        yield False
        return
    # mallopt returns 0 for a value it refuses; whatever was set is put back below either way
    applied = all([libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM),
                   libc.mallopt(_M_MMAP_MAX, 0)])
    try:
        yield applied
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAPS)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)


THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_for_tensors(setting: str = THP_SETTING) -> bool:
    """Have torch back its CPU tensors of 2 MB or more with transparent huge pages; whether
    they are on. torch reads THP_MEM_ALLOC_ENABLE once, at its first CPU allocation, so only
    a process's entry point can set it (the command line does, before importing torch).

    A CPU training step streams several GB of activations through memory; with 4 KB pages
    that is a TLB entry per 4 KB, and a miss in a virtual machine walks two page tables. Huge
    pages pay off because freed memory is kept between steps (freed_memory_kept): zero-filled
    once, not on every step. The values computed are the same; only where they sit changes.

    Left alone where THP_MEM_ALLOC_ENABLE is already set (0 turns this off), where MALLOC_*
    variables tune glibc for a small memory limit (Binder: 2 MB alignment would waste some of
    it), and where the kernel offers no huge pages on request (not Linux, or "never")."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    if allocator_tuned_by_environment():
        return False
    try:
        with open(setting) as f:
            offered = "[never]" not in f.read()
    except OSError:
        return False
    if offered:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return offered
