"""Training stages in several processes: ``accelerate launch`` with a config of ``recipes/accelerate/``.

A campaign whose recipe sets ``campaign.accelerate_config`` runs its RM
training, SFT and PPO stages as ``accelerate launch --config_file CFG -m
iterative_rlhf.cli ...`` subprocesses (DDP, FSDP or DeepSpeed ZeRO-3, as the
config says); everything else stays in the campaign's process. The launched
command is an ordinary CLI command (``rm train``, ``sft``, ``ppo``), so the same
stage can be launched by hand (README, "Several GPUs").

On a machine without CUDA, ``accelerate launch`` only starts several CPU
processes through ``mpirun`` (MULTI_CPU configs); a MULTI_GPU config with
``ACCELERATE_USE_CPU=true`` starts them with ``torch.distributed.run`` and gloo
instead, which is what :func:`launch_env` sets. ``ITERATIVE_RLHF_LAUNCHED`` marks
the launched processes so that they run the stage in-process instead of
launching again.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from .console import log
from .errors import UserError

#: Set in launched processes: they run their stage themselves.
LAUNCHED_ENV = "ITERATIVE_RLHF_LAUNCHED"


def inside_launch() -> bool:
    """True in a process started by :func:`run_launched` (or by any torchrun/accelerate launcher)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_accelerate_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"campaign.accelerate_config: {p}: no such accelerate config file (see recipes/accelerate/)")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) or "distributed_type" not in cfg:
        raise UserError(f"{p}: not an accelerate config (no distributed_type); write one with `accelerate config`")
    return cfg


def accelerate_command(config_file: str | Path, argv: Sequence[str], num_processes: int = 0,
                       program: Sequence[str] = ("-m", "iterative_rlhf.cli")) -> list[str]:
    """``python -m accelerate.commands.launch --config_file CFG [--num_processes N] -m iterative_rlhf.cli ARGV``.

    ``program``: what runs in each process (default the CLI; a script path works too). One-machine
    configs get a free rendezvous port, so that two launches on one machine do not collide.
    """
    cfg = read_accelerate_config(config_file)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    if int(cfg.get("num_machines", 1)) == 1:
        cmd += ["--main_process_port", str(_free_port())]
    return [*cmd, *program, *argv]


def launch_env() -> dict[str, str]:
    """The launched processes' environment: marked as launched; CPU processes over gloo without CUDA."""
    import torch

    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def run_launched(config_file: str | Path, argv: Sequence[str], *, num_processes: int = 0, what: str = "stage",
                 program: Sequence[str] = ("-m", "iterative_rlhf.cli")) -> None:
    """Run one CLI command (or ``program``) under ``accelerate launch`` and wait; a failure raises UserError."""
    cmd = accelerate_command(config_file, argv, num_processes, program)
    log(f"{what}: {shlex.join(cmd[1:])}")
    rc = subprocess.run(cmd, env=launch_env(), check=False).returncode
    if rc != 0:
        raise UserError(f"{what}: `{shlex.join(cmd[1:])}` failed with exit status {rc} (its output is above); "
                        "rerun the campaign to continue after fixing it")
