"""The web process never loads the inference runtime or the training stack.

Every page, API and the OpenAI-compatible endpoint are imported (the ASGI application
and every view its URLconf names), in a fresh interpreter, and the heavy libraries a
worker uses must not be among the loaded modules: a web server stays small, starts fast,
and runs on a host without llama.cpp's build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import aibox.asgi
from django.urls import URLPattern, URLResolver, get_resolver

def views(patterns):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from views(pattern.url_patterns)
        elif isinstance(pattern, URLPattern):
            yield pattern.callback

count = sum(1 for _ in views(get_resolver().url_patterns))
heavy = sorted(m for m in ("llama_cpp", "torch", "transformers", "peft") if m in sys.modules)
print(json.dumps({"views": count, "heavy": heavy}))
"""


def test_the_web_process_loads_no_runtime_and_no_training_stack():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["views"] > 100  # every page and API route was imported
    assert loaded["heavy"] == [], f"the web process imported {loaded['heavy']}"
