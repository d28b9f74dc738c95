"""llama.cpp's own command-line tools, built once from the pinned llama-cpp-python's source.

The references AIBox is measured against (``llama-perplexity``, ``llama-server``…) must
be the llama.cpp AIBox runs: the ``vendor/llama.cpp`` inside the source package of the
llama-cpp-python version pinned in pyproject.toml. This downloads that package once
into ``var/llama.cpp/``, configures it with CMake and builds only the targets asked for
(about 25 minutes on two cores the first time; later runs reuse the build).

    .venv/bin/python bench/llama_tools.py llama-perplexity llama-quantize
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = ROOT / "var" / "llama.cpp"


def pinned_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"llama-cpp-python==([^"]+)"', text)
    if match is None:
        raise SystemExit("pyproject.toml pins no llama-cpp-python version.")
    return match.group(1)


def _say(message: str) -> None:
    print(f"[llama.cpp tools] {message}", flush=True)


def source_dir() -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python's source package, unpacked once."""
    version = pinned_version()
    unpacked = HOME / f"llama_cpp_python-{version}"
    vendor = unpacked / "vendor" / "llama.cpp"
    if vendor.is_dir():
        return vendor
    HOME.mkdir(parents=True, exist_ok=True)
    archive = HOME / f"llama_cpp_python-{version}.tar.gz"
    if not archive.exists():
        _say(f"downloading the source of llama-cpp-python {version} (from PyPI)")
        subprocess.run(  # noqa: S603 - our interpreter, fixed arguments
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"llama-cpp-python=={version}",
                "-d",
                str(HOME),
            ],
            check=True,
        )
    _say(f"unpacking {archive.name}")
    with tarfile.open(archive) as tar:
        tar.extractall(HOME, filter="data")
    return vendor


def tool(name: str) -> Path:
    """The path of a built llama.cpp tool (``llama-perplexity``…), building it if needed."""
    build = HOME / f"build-{pinned_version()}"
    binary = build / "bin" / name
    if binary.exists():
        return binary
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SystemExit("Building llama.cpp's tools needs cmake (apt install cmake).")
    source = source_dir()
    if not (build / "CMakeCache.txt").exists():
        _say("configuring (CPU build, no curl)")
        subprocess.run(  # noqa: S603 - fixed arguments
            [
                cmake,
                "-S",
                str(source),
                "-B",
                str(build),
                "-DLLAMA_CURL=OFF",
                "-DCMAKE_BUILD_TYPE=Release",
                "-DLLAMA_BUILD_TESTS=OFF",
            ],
            check=True,
        )
    _say(f"building {name} (the first time takes a while; progress follows)")
    subprocess.run(  # noqa: S603 - fixed arguments
        [cmake, "--build", str(build), "--target", name, "-j2"], check=True
    )
    return binary


if __name__ == "__main__":
    for target in sys.argv[1:] or ["llama-perplexity"]:
        print(tool(target))
