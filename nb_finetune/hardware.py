"""What this machine can do, each answer cached: CUDA, bf16, bitsandbytes, Liger Kernel.

Panels disable controls that cannot work and show the reason returned here.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass


@functools.cache
def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@functools.cache
def bf16_supported() -> bool:
    """bf16 arithmetic that is fast here: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX."""
    import torch
    if cuda_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def bitsandbytes_available() -> tuple[bool, str]:
    """(usable, reason if not)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "bitsandbytes is not installed (pip install bitsandbytes)"
    from importlib.metadata import version
    v = tuple(int(x) for x in version("bitsandbytes").split(".")[:2])
    if not cuda_available() and v < (0, 47):
        return False, f"bitsandbytes {version('bitsandbytes')} needs a GPU; 0.47 or newer runs 4-bit on CPU"
    return True, ""


@functools.cache
def liger_available() -> tuple[bool, str]:
    """Liger Kernel's Triton kernels: (usable, reason if not). Checked without importing it."""
    if not cuda_available():
        return False, "Liger Kernel needs a CUDA GPU (its kernels are Triton)"
    for module, package in (("triton", "triton"), ("liger_kernel", "liger-kernel")):
        if importlib.util.find_spec(module) is None:
            return False, f"{package} is not installed (pip install {package})"
    return True, ""


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all; checked once, so an offline machine fails
    in seconds instead of after the hub client's retries (about a minute)."""
    import os
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def device() -> str:
    return "cuda" if cuda_available() else "cpu"


@dataclass(frozen=True)
class Precision:
    """How training computes, decided from the config's choice and the hardware facts alone."""
    dtype: str          # 'bfloat16', 'float16' or 'float32', for autocast and the 4-bit compute dtype
    bf16_allowed: bool  # whether the panel offers bfloat16
    reason: str         # why bfloat16 is not offered or not used, '' when it is
    loss_scaling: bool  # fp16 scales the loss so small gradients do not underflow to zero


def precision_policy(choice: str, cuda: bool, bf16: bool) -> Precision:
    """A pure function of the facts, so its table is tested without the hardware.

    A GPU without bf16 (T4, V100) computes in fp16 with loss scaling: it has fp16 tensor cores,
    and bf16 there is refused by the Trainer. A CPU without bf16 instructions computes in fp32:
    torch would emulate bf16, many times slower per matmul."""
    where = "GPU (T4, V100 and older have no bf16; fp16 with loss scaling instead)" if cuda else \
        "CPU (no AVX-512 BF16 or AMX; torch would emulate it, many times slower)"
    reason = "" if bf16 else f"bfloat16: not supported on this {where}"
    if choice == "auto":
        dtype = "bfloat16" if bf16 else ("float16" if cuda else "float32")
    elif choice == "bfloat16" and not bf16:
        dtype = "float16" if cuda else "float32"
    else:
        dtype = choice
    return Precision(dtype, bf16, reason, loss_scaling=dtype == "float16")


def precision(choice: str = "auto") -> Precision:
    return precision_policy(choice, cuda_available(), bf16_supported())


def compute_dtype(choice: str = "auto") -> str:
    """'bfloat16', 'float16' or 'float32' for autocast, from the config's choice and the hardware."""
    return precision(choice).dtype


def gpus() -> list[str]:
    """Each CUDA device as 'name, N GiB'; empty without CUDA."""
    if not cuda_available():
        return []
    import torch
    return [f"{p.name}, {p.total_memory / 2**30:.0f} GiB"
            for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))]


def describe() -> dict:
    ok, why = bitsandbytes_available()
    info = {"device": device(), "bf16": bf16_supported(), "bitsandbytes": ok or why}
    if cuda_available():
        info["gpu"] = gpus()[0]
    return info


def device_memory() -> int:
    """Bytes of memory on the device that trains: the first GPU's, else the machine's RAM."""
    if cuda_available():
        import torch
        return torch.cuda.get_device_properties(0).total_memory
    import psutil
    return psutil.virtual_memory().total


def summary() -> str:
    """One line for a panel: the GPU found and its memory, or the CPU, with what it supports."""
    import os
    ok, why = bitsandbytes_available()
    found = gpus()
    if found:
        where = f"GPU: {found[0]}" + (f" (x{len(found)})" if len(found) > 1 else "")
    else:
        where = f"CPU only: {os.cpu_count()} cores, {device_memory() / 2**30:.0f} GiB RAM"
    return (f"{where}; bf16 {'yes' if bf16_supported() else 'no'}; "
            f"4/8-bit (bitsandbytes) {'yes' if ok else 'no: ' + why}")
