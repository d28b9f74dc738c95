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


def hardware_class(info: dict) -> str:
    """A short name for a kind of machine, from an inventory or heartbeat dict.

    Trials measured on machines of one class are compared with each other, so the name
    keeps what decides the speed of a model (the GPUs, or else the CPU, its cores and
    memory) and leaves out what changes from minute to minute (free memory, the host).
    For example ``gpu:NVIDIA L4x2:22G`` (memory per GPU) or
    ``cpu:AMD EPYC 7R13 Processor:8c:31G``.
    """
    gpus = info.get("gpus") or []
    if gpus:
        # Grouped by model and memory, in a fixed order, so a mixed box always reads alike.
        counts: dict[tuple[str, int], int] = {}
        for gpu in gpus:
            key = (_squeeze(gpu.get("name", "")) or "unknown", _gib(gpu.get("memory_total_mib", 0)))
            counts[key] = counts.get(key, 0) + 1
        return "gpu:" + "+".join(
            f"{name}x{count}:{gib}G" for (name, gib), count in sorted(counts.items())
        )
    cpu = _squeeze(info.get("cpu_model", "")) or "unknown"
    return f"cpu:{cpu}:{info.get('cpu_cores', 0)}c:{_gib(info.get('ram_total_mib', 0))}G"


def _gib(mib: int) -> int:
    # Rounded, not floored: MemTotal and a GPU's usable memory sit a little below the
    # size on the box, and a 16 GiB machine should read 16.
    return round((mib or 0) / 1024)


def _squeeze(text: str) -> str:
    return " ".join(str(text).split())
