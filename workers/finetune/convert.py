"""The base GGUF as a Hugging Face checkpoint that transformers and peft can train.

transformers reads a GGUF by dequantising every tensor to float32, which takes about a
minute for Gemma 3 270M on two cores and far longer for big models. The result is kept
under ``cache_dir/<sha256>/`` (safetensors, config, tokenizer and a small
``aibox-conversion.json``) so the next job on the same base starts in seconds.

Two workers may convert the same model at once: an exclusive lock file serialises them
(the second finds the first's result), and the conversion is written to a temporary
directory that is renamed into place only when complete, so a reader never sees half a
checkpoint, even after a worker was killed mid-way.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.artifacts import file_sha256
from workers.finetune.spec import FinetuneError

MARKER = "aibox-conversion.json"


def converted_checkpoint(
    gguf_path: Path, sha256: str, cache_dir: Path, *, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """(checkpoint directory, conversion info), converting the GGUF on first use."""
    final = cache_dir / sha256
    if (final / MARKER).is_file():
        return final, json.loads((final / MARKER).read_text())
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{sha256}.lock", "a") as lock:
        started = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MARKER).is_file():
            waited = time.monotonic() - started
            log(f"Another worker converted the base model meanwhile (waited {waited:.0f} s).")
            return final, json.loads((final / MARKER).read_text())
        # Left by a worker that died while converting (we hold the lock: none is running).
        for stale in cache_dir.glob(f".{sha256[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{sha256[:16]}-", dir=cache_dir))
        try:
            info = _convert(gguf_path, sha256, tmp, log=log)
            shutil.rmtree(final, ignore_errors=True)  # a directory without its marker
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, info


def _convert(gguf_path: Path, sha256: str, out: Path, *, log: Callable[[str], None]) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.gguf_meta import read_metadata_cached

    log(
        "Converting the base model for training (dequantising the GGUF to float32). This "
        "happens once per base model and takes a minute or more; later jobs reuse it."
    )
    started = time.monotonic()
    if file_sha256(gguf_path) != sha256:
        raise FinetuneError("The base model file does not match its sha256; refusing it.")
    meta = read_metadata_cached(gguf_path, sha256)
    # transformers finds a GGUF by directory and file name; store paths have no suffix.
    source = out / "source.gguf"
    source.symlink_to(gguf_path.resolve())
    transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            out, gguf_file=source.name, dtype=torch.float32
        )
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for unsupported files
        raise FinetuneError(f"transformers could not read the base model: {exc}") from exc
    finally:
        source.unlink()
    # The weights are plain float32 tensors now; drop the GGUF "quantizer" so the model
    # saves (and later loads) as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    template = _gguf_chat_template(gguf_path) if meta.has_chat_template else None
    info = {
        "sha256": sha256,
        "architecture": meta.architecture,
        "name": meta.name,
        "context_length": meta.context_length,
        "chat_template": template,
        "seconds": round(time.monotonic() - started, 1),
        "transformers": transformers.__version__,
    }
    (out / MARKER).write_text(json.dumps(info, indent=2))
    log(f"Converted the base model in {info['seconds']:.0f} s.")
    return info


def _gguf_chat_template(path: Path) -> str | None:
    from workers.gguf_meta import read_header

    template = read_header(path).fields.get("tokenizer.chat_template")
    return str(template) if template is not None else None
