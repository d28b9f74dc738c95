"""Small LoRA adapters in the GGUF layout AIBox exports (workers/finetune/export.py), for
tests: random weights for a real base, or exactly the tensors a test needs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, Keys

from workers.gguf_meta import read_header


def write_lora(
    out_path: Path,
    *,
    architecture: str,
    alpha: float,
    pairs: dict[str, tuple[np.ndarray, np.ndarray]],
) -> Path:
    """Write a LoRA adapter with ``pairs`` {base tensor name: (lora_a, lora_b)}, each in
    numpy order: lora_a (rank, in) and lora_b (out, rank), token_embd the other way round."""
    writer = GGUFWriter(out_path, arch=architecture)
    writer.add_type("adapter")
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_file_type(0)  # all tensors F32
    for name, (a, b) in pairs.items():
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def write_random_lora(
    base_path: Path,
    out_path: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("attn_q", "attn_v"),
    seed: int = 0,
    magnitude: float = 0.05,
) -> Path:
    """Write a LoRA adapter for the GGUF model at ``base_path`` that adapts every
    ``blk.N.<target>.weight`` with normal random A and B of standard deviation
    ``magnitude`` (the delta, alpha / rank × B @ A, grows with its square)."""
    reader = read_header(base_path)  # names and shapes only: quick on a large vocabulary
    architecture = str(reader.fields["general.architecture"])
    pattern = re.compile(rf"^blk\.\d+\.(?:{'|'.join(map(re.escape, targets))})\.weight$")
    rng = np.random.default_rng(seed)
    pairs = {}
    for tensor in reader.tensors:
        if pattern.match(tensor.name):
            n_in, n_out = (int(n) for n in tensor.shape)
            pairs[tensor.name] = (
                rng.normal(0.0, magnitude, (rank, n_in)),
                rng.normal(0.0, magnitude, (n_out, rank)),
            )
    if not pairs:
        raise ValueError(f"The base has no weights named like {pattern.pattern}.")
    return write_lora(out_path, architecture=architecture, alpha=alpha, pairs=pairs)
