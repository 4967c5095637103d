"""A job folder for an existing launcher (torchrun or accelerate).

The folder holds the config and the scripts; the job itself is `nb-finetune run --config
config.yaml` inside the launcher, so a run set up in a notebook moves to several processes,
GPUs or machines unchanged. Processes per node, nodes, node rank and the main address are
parameters of the scripts (environment variables with defaults). So is the Python they run:
by default the one that wrote the folder, since the environment holding nb_finetune and torch
(a venv, a notebook kernel's) need not be on PATH where the job starts.
"""
from __future__ import annotations

import shlex
import stat
import sys
from pathlib import Path

from ..config import RunConfig

_TORCHRUN = """#!/usr/bin/env bash
# Runs the job with torchrun (torch.distributed.run). Parameters (environment, with defaults):
#   PYTHON          the Python with nb_finetune and torch (default: the one that wrote this
#                   folder, __PYTHON__, where it exists here; else python on PATH)
#   NPROC_PER_NODE  processes on this machine (default: one per GPU, or 2 on a CPU-only machine)
#   NNODES          machines in the job (default 1); NODE_RANK this machine's index (default 0)
#   MASTER_ADDR     address of the machine with NODE_RANK 0 (default 127.0.0.1); MASTER_PORT (default 29500)
# Extra arguments go to `nb-finetune run`, e.g. --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")"
WRITER=__PYTHON__
PYTHON=${PYTHON:-$([ -x "$WRITER" ] && echo "$WRITER" || echo python)}
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NPROC_PER_NODE=${NPROC_PER_NODE:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}
exec "$PYTHON" -m torch.distributed.run \\
  --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \\
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \\
  -m nb_finetune run --config config.yaml "$@"
"""

_ACCELERATE = """#!/usr/bin/env bash
# Runs the job with accelerate (accelerate.commands.launch). Parameters (environment, with defaults):
#   PYTHON             the Python with nb_finetune and torch (default: the one that wrote this
#                      folder, __PYTHON__, where it exists here; else python on PATH)
#   ACCELERATE_CONFIG  accelerate_ddp.yaml (default), accelerate_fsdp.yaml or accelerate_deepspeed.yaml
#   NUM_PROCESSES      processes in all (default: one per GPU, or 2 on a CPU-only machine)
#   NUM_MACHINES (default 1), MACHINE_RANK (default 0), MAIN_PROCESS_IP (default 127.0.0.1),
#   MAIN_PROCESS_PORT (default 29500)
# Extra arguments go to `nb-finetune run`, e.g. --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")"
WRITER=__PYTHON__
PYTHON=${PYTHON:-$([ -x "$WRITER" ] && echo "$WRITER" || echo python)}
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
NUM_MACHINES=${NUM_MACHINES:-1}
NUM_PROCESSES=${NUM_PROCESSES:-$(( ($GPUS > 0 ? $GPUS : 2) * NUM_MACHINES ))}
exec "$PYTHON" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG:-accelerate_ddp.yaml}" \\
  --num_processes "$NUM_PROCESSES" --num_machines "$NUM_MACHINES" --machine_rank "${MACHINE_RANK:-0}" \\
  --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" --main_process_port "${MAIN_PROCESS_PORT:-29500}" \\
  -m nb_finetune run --config config.yaml "$@"
"""

_DDP = """# DDP (data parallel): every process holds the whole model and trains on its own shard of the
# data; gradients are averaged each step. The right choice whenever the model (a 4-bit base
# with LoRA adapters, say) fits on one GPU: the usual case for LoRA and QLoRA. On a machine
# without GPUs the same file runs the processes on the CPU (gloo).
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: 29500
num_processes: 2
mixed_precision: 'no'   # the run's own model.compute_dtype decides (bf16 where the hardware has it)
rdzv_backend: static
same_network: true
"""

_FSDP = """# FSDP (fully sharded data parallel): parameters, gradients and optimizer state are split
# across the GPUs, so a model too large for one GPU in 16-bit can still be trained with LoRA.
# Costs more communication than DDP; use it only when DDP runs out of memory. Not for 4-bit
# (QLoRA) bases: set model.quantization: none with it.
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_cpu_ram_efficient_loading: true
  fsdp_offload_params: false
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_use_orig_params: true   # LoRA mixes frozen and trainable parameters in one layer
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: 29500
num_processes: 2
mixed_precision: bf16
"""

_DEEPSPEED = """# DeepSpeed ZeRO stage 3: like FSDP, shards parameters, gradients and optimizer state, and
# can offload them to CPU memory (set offload_*_device: cpu) when even sharded they do not fit.
# Needs `pip install deepspeed`. Prefer DDP, then FSDP; reach for this one for the largest
# models or when CPU offload is needed.
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: false
  zero3_save_16bit_model: true
  gradient_accumulation_steps: auto
num_machines: 1
machine_rank: 0
main_process_ip: 127.0.0.1
main_process_port: 29500
num_processes: 2
mixed_precision: bf16
"""

_README = """# {name}: a fine-tuning job

`config.yaml` is the whole run (data, model, training, evaluation). Run it on this machine
with `nb-finetune run --config config.yaml`, or on several processes:

    NPROC_PER_NODE=4 ./launch_torchrun.sh                  # one machine, 4 GPUs
    NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./launch_torchrun.sh   # on each of 2 machines
    ./launch_accelerate.sh                                 # accelerate, DDP
    ACCELERATE_CONFIG=accelerate_fsdp.yaml ./launch_accelerate.sh

The scripts run the Python that wrote this folder; set PYTHON to use another one
(`PYTHON=/path/to/venv/bin/python ./launch_torchrun.sh`), e.g. on another machine.

Which engine: DDP (`accelerate_ddp.yaml`, or torchrun) whenever the model fits on one GPU;
FSDP when it does not; DeepSpeed ZeRO-3 when even sharded it does not, with CPU offload.

The batch: each optimizer step sees batch_size x processes x grad_accum rows. Set
`train.effective_batch` in the config to keep that number (and so the training) the same when
the process count changes: grad_accum is then derived from it.

Only the main process prints and writes files: one history, one adapter, one report in
`train.output_dir`. A checkpoint from a run on N processes resumes on any other number
(`--set train.resume_from=last`).
"""


def export_job(cfg: RunConfig, folder: str | Path, python: str = sys.executable) -> Path:
    """Write the job folder; returns its path. `python`: the scripts' default interpreter."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.validate().save(folder / "config.yaml")
    writer = shlex.quote(python)
    files = {"launch_torchrun.sh": _TORCHRUN.replace("__PYTHON__", writer),
             "launch_accelerate.sh": _ACCELERATE.replace("__PYTHON__", writer),
             "accelerate_ddp.yaml": _DDP, "accelerate_fsdp.yaml": _FSDP, "accelerate_deepspeed.yaml": _DEEPSPEED,
             "README.md": _README.format(name=folder.name)}
    for name, text in files.items():
        path = folder / name
        path.write_text(text, encoding="utf-8")
        if name.endswith(".sh"):
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder
