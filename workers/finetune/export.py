"""A PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads beside its base.

The layout is llama.cpp's (its convert_lora_to_gguf.py and llama-adapter.cpp):

- metadata: general.architecture of the base, general.type "adapter", adapter.type
  "lora", adapter.lora.alpha (llama.cpp scales by alpha / rank, as PEFT does);
- per adapted weight, two tensors named after the base tensor: ``<name>.lora_a`` with
  PEFT's lora_A as is, shape (rank, in) in numpy order, i.e. ggml ne = [in, rank], and
  ``<name>.lora_b`` with lora_B as is, (out, rank), ne = [rank, out]. llama.cpp checks
  these against the base weight's ne = [in, out].

Tensor names come from the gguf package's tensor map for the architecture
(``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q.weight``). Only architectures whose
llama.cpp conversion copies the projections unchanged are exported
(spec.SUPPORTED_ARCHITECTURES); others would need the same rewrite applied to lora_B.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from workers.finetune.spec import SUPPORTED_ARCHITECTURES, FinetuneError

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def export_gguf_lora(peft_dir: Path, *, base_gguf_path: Path, out_path: Path) -> Path:
    """Write ``out_path`` (atomically) from a PEFT adapter directory; return it."""
    from gguf import GGUFWriter, Keys, TensorNameMap
    from safetensors.numpy import load_file

    from workers.gguf_meta import read_header

    config = json.loads((peft_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise FinetuneError(f"Not a LoRA adapter (peft_type {config.get('peft_type')!r}).")
    for option in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(option):
            # llama.cpp applies one alpha / rank scale to every tensor of an adapter.
            raise FinetuneError(f"llama.cpp cannot apply a LoRA adapter that uses {option}.")

    # The header only (names and shapes): the base's tensors are not read.
    header = read_header(base_gguf_path)
    arch = str(header.fields["general.architecture"])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FinetuneError(f"Exporting a LoRA adapter for '{arch}' models is not supported.")
    blocks = int(header.fields[f"{arch}.block_count"])
    base_shapes = {t.name: list(t.shape) for t in header.tensors}
    names = TensorNameMap(_model_arch(arch), blocks)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(peft_dir / "adapter_model.safetensors").items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise FinetuneError(f"Unexpected tensor in the adapter: {key}.")
        module = match["module"]
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None or target not in base_shapes:
            raise FinetuneError(f"The base model has no weight for the adapted module {module}.")
        pairs.setdefault(target, {})[match["part"]] = value.astype(np.float32)

    tensors = []
    for target, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise FinetuneError(f"The adapter has only half of the LoRA pair for {target}.")
        a, b = pair["A"], pair["B"]
        n_in, n_out = base_shapes[target][:2]
        if a.shape[1] != n_in or b.shape[0] != n_out or a.shape[0] != b.shape[1]:
            raise FinetuneError(
                f"LoRA shapes {a.shape} and {b.shape} do not fit {target} ({n_out}x{n_in})."
            )
        tensors.append((target, a, b))
    if not tensors:
        raise FinetuneError("The adapter holds no LoRA weights.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=".adapter-", suffix=".gguf")
    os.close(fd)
    try:
        writer = GGUFWriter(tmp_name, arch=arch)
        writer.add_type("adapter")
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
        writer.add_file_type(0)  # all tensors F32
        for target, a, b in sorted(tensors, key=lambda t: _natural(t[0])):
            writer.add_tensor(f"{target}.lora_a", a)
            writer.add_tensor(f"{target}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_path


def _model_arch(name: str):
    from gguf import MODEL_ARCH_NAMES

    return next(arch for arch, arch_name in MODEL_ARCH_NAMES.items() if arch_name == name)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
