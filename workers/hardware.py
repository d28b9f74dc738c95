"""What this machine has: CPU cores, memory and NVIDIA GPUs, for worker heartbeats."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int


@dataclass(frozen=True)
class Inventory:
    host: str
    cpu_cores: int
    cpu_model: str
    ram_total_mib: int
    ram_available_mib: int
    gpus: list[Gpu] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _meminfo() -> dict[str, int]:
    """/proc/meminfo values in MiB (Linux; other systems report zeros)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_gpus(timeout: float = 5.0) -> list[Gpu]:
    """GPUs as nvidia-smi reports them; none when the tool or a driver is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    query = "--query-gpu=index,name,memory.total,memory.free"
    try:
        result = subprocess.run(  # noqa: S603 - fixed arguments, resolved binary
            [smi, query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(result.stdout)


def parse_nvidia_smi(output: str) -> list[Gpu]:
    gpus = []
    for line in output.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            gpus.append(Gpu(int(parts[0]), parts[1], int(parts[2]), int(parts[3])))
        except ValueError:
            continue
    return gpus


def inventory() -> Inventory:
    mem = _meminfo()
    return Inventory(
        host=socket.gethostname(),
        cpu_cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1),
        cpu_model=_cpu_model(),
        ram_total_mib=mem.get("MemTotal", 0),
        ram_available_mib=mem.get("MemAvailable", 0),
        gpus=nvidia_gpus(),
    )
