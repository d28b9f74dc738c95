import ast
import os
import shutil
from pathlib import Path

from workers.hardware import inventory, parse_nvidia_smi


def test_inventory_describes_this_machine():
    inv = inventory()
    assert inv.cpu_cores == len(os.sched_getaffinity(0))
    assert inv.ram_total_mib > 1024
    assert 0 < inv.ram_available_mib <= inv.ram_total_mib
    if shutil.which("nvidia-smi") is None:
        assert inv.gpus == []
    assert inv.as_dict()["host"] == inv.host


def test_parse_nvidia_smi_output():
    output = "0, NVIDIA H100 80GB HBM3, 81559, 80100\n1, NVIDIA L4, 23034, 22000\nbroken line\n"
    gpus = parse_nvidia_smi(output)
    assert [(g.index, g.name, g.memory_total_mib, g.memory_free_mib) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 81559, 80100),
        (1, "NVIDIA L4", 23034, 22000),
    ]


def test_workers_package_never_imports_django():
    root = Path(__file__).resolve().parents[2] / "workers"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("django", "apps", "aibox")), f"{path}: imports {name}"
