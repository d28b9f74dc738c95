"""A fine-tune's adapter merged into its base, quantised and evaluated: the merged file
answers like base + adapter, and the held-out split says the fine-tune helped."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from apps.accounts.models import Role, User
from apps.accounts.services import system_user
from apps.datasets.services import dataset_create
from apps.finetune.models import FineTuneJob, JobState
from apps.optimise.models import Evaluation, ModelJob
from apps.registry.artifacts import artifact_store
from apps.registry.bundled import model_register_bundled
from apps.registry.models import ModelVersion, SourceKind
from tests.conftest import client_for, make_user
from tests.datasets.conftest import jsonl, upload, wait_validated
from tests.finetune.conftest import TRAIN_ROWS
from tests.live import wait_until
from tests.optimise.conftest import committed_module, post, run_evaluation, run_job
from workers.inference.templates import GEMMA_TEMPLATE

pytestmark = pytest.mark.django_db

HELD_OUT = [
    {
        "messages": [
            {"role": "user", "content": f"What is the secret word number {i}?"},
            {"role": "assistant", "content": "The secret word is PAPAYA."},
        ]
    }
    for i in range(20, 26)
]


@dataclass
class Merged:
    dana: User
    gemma: ModelVersion
    job: FineTuneJob
    merged: ModelVersion
    merged_q8: ModelVersion
    scores: dict[str, Evaluation]


@pytest.fixture(scope="module")
def merged(test_database, django_db_blocker, live_worker, training_worker) -> Iterator[Merged]:
    with committed_module(django_db_blocker, live_worker):
        yield _build()


def _build() -> Merged:
    dana = make_user(Role.DATA_SCIENTIST, username="merge-dana")
    gemma = model_register_bundled(actor=system_user()).version
    dataset = dataset_create(actor=dana, name="secrets", licence="cc-by-4.0")
    train = wait_validated(upload(dana, dataset, "train.jsonl", jsonl(TRAIN_ROWS)).json()["id"])
    held_out = wait_validated(upload(dana, dataset, "held.jsonl", jsonl(HELD_OUT)).json()["id"])
    # As tests/finetune/test_served_adapter.py: a few steps at a high constant rate.
    response = post(
        dana,
        "/api/v1/finetunes/",
        {
            "base_model": gemma.pk,
            "dataset_version": train.pk,
            "params": {
                "lora_rank": 4,
                "lora_alpha": 8,
                "max_seq_length": 64,
                "learning_rate": 5e-3,
                "lr_scheduler": "constant",
                "max_steps": 6,
                "checkpoint_every": 50,
            },
        },
    )
    assert response.status_code == 201, response.content

    def finished():
        job = FineTuneJob.objects.get(pk=response.json()["id"])
        return job if not job.active else None

    job = wait_until(finished, what="the fine-tune finishing", timeout=900)
    assert job.state == JobState.SUCCEEDED, job.reason

    merged = run_job(
        dana, {"operation": "export", "source": gemma.pk, "adapter": job.adapter.pk}
    ).output_version
    merged_q8 = run_job(
        dana, {"operation": "quantize", "source": merged.pk, "quant_type": "Q8_0"}
    ).output_version
    scores = {}
    for label, version, adapter in (
        ("base", gemma, None),
        ("base+adapter", gemma, job.adapter),
        ("merged", merged, None),
    ):
        scores[label] = run_evaluation(
            dana,
            {
                "model_version": version.pk,
                "adapter": adapter.pk if adapter else None,
                "dataset_version": held_out.pk,
            },
        )
    return Merged(dana, gemma, job, merged, merged_q8, scores)


def test_the_merged_version_names_base_adapter_fine_tune_and_data(merged):
    m, job = merged.merged, merged.job
    assert m.quantization == "F16" and m.source_kind == SourceKind.EXPORTED
    assert m.repo.name == f"{job.adapter.repo.name}-merged"
    assert set(m.parents.all()) == {merged.gemma, job.adapter}
    assert m.source["adapter_sha256"] == job.adapter.sha256
    assert m.source["finetune_job"] == job.pk
    assert m.source["trained_on"][0]["sha256"] == job.dataset_version.sha256
    assert list(merged.merged_q8.parents.all()) == [m]
    assert merged.merged_q8.quantization == "Q8_0" and not merged.merged_q8.source["requantized"]

    # The lineage and the ML-BOM walk the whole chain: data → fine-tune → adapter → merged.
    client = client_for(merged.dana)
    lineage = client.get(f"/api/v1/registry/versions/{merged.merged_q8.pk}/lineage").json()
    keys = {n["id"] for n in lineage["nodes"]}
    assert {
        f"model_version:{merged.gemma.pk}",
        f"model_version:{job.adapter.pk}",
        f"finetune_job:{job.pk}",
        f"dataset_version:{job.dataset_version.pk}",
    } <= keys
    bom = client.get(f"/api/v1/registry/versions/{m.pk}/bom.cdx.json")
    assert bom.status_code == 200, bom.content
    hashes = {h["content"] for c in bom.json()["components"] for h in c.get("hashes", [])}
    assert {merged.gemma.sha256, job.adapter.sha256, job.dataset_version.sha256} <= hashes


def test_the_merged_model_answers_like_base_and_adapter(merged):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    store = artifact_store()
    base = str(store.verify(merged.gemma.sha256))
    adapter = str(store.verify(merged.job.adapter.sha256))
    formatter = Jinja2ChatFormatter(
        template=GEMMA_TEMPLATE, eos_token="<eos>", bos_token="", add_generation_prompt=True
    )  # create_completion adds BOS itself

    def answers(**model) -> list[str]:
        llm = Llama(n_ctx=256, verbose=False, seed=0, **model)
        try:
            return [
                llm.create_completion(
                    formatter(messages=[{"role": "user", "content": q}]).prompt,
                    max_tokens=12,
                    temperature=0,
                )["choices"][0]["text"]
                for q in ("What is the secret word number 3?", "What is the secret word number 40?")
            ]
        finally:
            llm.close()

    served = answers(model_path=base, lora_path=adapter)
    alone = answers(model_path=str(store.verify(merged.merged.sha256)))
    # The merged weights are base + B·A·scale rounded to F16, where serving adds B·A·x to
    # the quantised product: greedy answers agree on what the adapter taught (the first
    # sentence, the secret word in it), and may part a few tokens later, where the two
    # ways of rounding tip a close choice (seen: "PAPAYA.Both ..." against "PAPAYA.The ...").
    assert all("PAPAYA" in answer for answer in served + alone), (alone, served)
    first = [[answer.split(".")[0] for answer in answers] for answers in (alone, served)]
    assert first[0] == first[1], (alone, served)


def test_the_held_out_split_scores_the_fine_tune_above_the_base(merged):
    base, tuned, alone = (merged.scores[k] for k in ("base", "base+adapter", "merged"))
    assert base.result["n"] == tuned.result["n"] == len(HELD_OUT)
    assert base.contains == 0
    assert tuned.contains > base.contains and tuned.contains >= 0.5
    assert alone.contains == tuned.contains and alone.exact_match == tuned.exact_match
    examples = tuned.result["examples"]
    assert examples[0]["expected"] == "The secret word is PAPAYA."


def test_an_adapter_is_refused_on_a_base_it_was_not_trained_on(merged):
    before = ModelJob.objects.count(), Evaluation.objects.count()
    response = post(
        merged.dana,
        "/api/v1/optimise/jobs/",
        {"operation": "export", "source": merged.merged.pk, "adapter": merged.job.adapter.pk},
    )
    assert response.status_code == 400
    assert f"was trained on {merged.gemma}, not on {merged.merged}" in response.json()["adapter"][0]
    response = post(
        merged.dana,
        "/api/v1/optimise/evaluations/",
        {
            "model_version": merged.merged.pk,
            "adapter": merged.job.adapter.pk,
            "dataset_version": merged.job.dataset_version.pk,
        },
    )
    assert response.status_code == 400 and "was trained on" in str(response.json())
    assert (ModelJob.objects.count(), Evaluation.objects.count()) == before
