"""The bundled Gemma exported at F16, quantised to Q8_0 and Q4_0 and evaluated: through
the API, on the training worker, with llama.cpp doing the quantising and the scoring."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from apps.accounts.models import Role, User
from apps.accounts.services import system_user
from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.datasets.services import dataset_create
from apps.optimise.models import Evaluation
from apps.registry.artifacts import artifact_store
from apps.registry.bundled import model_register_bundled
from apps.registry.licences import version_licence
from apps.registry.models import ModelVersion, SourceKind, State
from apps.registry.services import model_version_approve, model_version_deploy_check
from tests.conftest import client_for, make_user
from tests.datasets.conftest import jsonl, upload, wait_validated
from tests.optimise.conftest import TEXT_ROWS, committed_module, run_evaluation, run_job

pytestmark = pytest.mark.django_db


@dataclass
class Chain:
    dana: User
    cora: User
    gemma: ModelVersion
    f16: ModelVersion
    q8: ModelVersion
    q4: ModelVersion
    q3: ModelVersion
    prose: DatasetVersion
    evaluations: dict[str, Evaluation]


@pytest.fixture(scope="module")
def chain(test_database, django_db_blocker, live_worker, training_worker) -> Iterator[Chain]:
    with committed_module(django_db_blocker, live_worker):
        yield _build()


def _build() -> Chain:
    dana = make_user(Role.DATA_SCIENTIST, username="opt-dana")
    cora = make_user(Role.COMPLIANCE_OFFICER, username="opt-cora")
    gemma = model_register_bundled(actor=system_user()).version
    dataset = dataset_create(actor=dana, name="prose", licence="cc-by-4.0")
    prose = wait_validated(upload(dana, dataset, "prose.jsonl", jsonl(TEXT_ROWS)).json()["id"])

    # The bundled file is Q4_K_M: dequantised to F16 first, as a data scientist would to
    # have an unquantised file to quantise from, in a model of her own.
    f16 = run_job(
        dana,
        {"operation": "export", "source": gemma.pk, "out_type": "f16", "output_repo": "gemma-opt"},
    ).output_version
    q8 = run_job(dana, {"operation": "quantize", "source": f16.pk, "quant_type": "Q8_0"})
    q4 = run_job(dana, {"operation": "quantize", "source": f16.pk, "quant_type": "Q4_0"})
    # Weighed by what mattered on the prose: an importance matrix computed on it first.
    q3 = run_job(
        dana,
        {
            "operation": "quantize",
            "source": f16.pk,
            "quant_type": "Q3_K_S",
            "imatrix_dataset": prose.pk,
            "imatrix_chunks": 2,
        },
    )
    evaluations = {}
    for label, version in (("f16", f16), ("q8", q8.output_version), ("q4", q4.output_version)):
        evaluations[label] = run_evaluation(
            dana,
            {
                "model_version": version.pk,
                "dataset_version": prose.pk,
                "reference": f16.pk if label != "f16" else None,
                "n_ctx": 128,
                "max_chunks": 16,
            },
        )
    return Chain(
        dana=dana,
        cora=cora,
        gemma=gemma,
        f16=f16,
        q8=q8.output_version,
        q4=q4.output_version,
        q3=q3.output_version,
        prose=prose,
        evaluations=evaluations,
    )


def test_export_and_quantisation_make_draft_versions_with_provenance(chain):
    f16, q8, q4 = chain.f16, chain.q8, chain.q4
    assert (f16.quantization, q8.quantization, q4.quantization) == ("F16", "Q8_0", "Q4_0")
    assert {v.state for v in (f16, q8, q4)} == {State.DRAFT}
    assert f16.source_kind == SourceKind.EXPORTED and q4.source_kind == SourceKind.QUANTIZED
    assert list(f16.parents.all()) == [chain.gemma] and list(q4.parents.all()) == [f16]
    assert f16.source["source_sha256"] == chain.gemma.sha256
    assert f16.source["source_quantization"] == "Q4_K_M"
    assert q4.source["source_sha256"] == f16.sha256
    assert q4.source["params"] == {"quant_type": "Q4_0", "allow_requantize": False}
    assert q4.source["requantized"] is False and q4.source["llama_cpp"]
    # F16 is two bytes a weight; the quantised files are what their types promise.
    assert f16.size == pytest.approx(2 * f16.parameter_count, rel=0.03)
    assert q8.size < 0.6 * f16.size and q4.size < q8.size
    # The licence is the source's: Gemma's terms bind every derived file.
    assert "gemma" in version_licence(q4)
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {
        "optimise.export.request",
        "optimise.export.succeeded",
        "optimise.quantize.request",
        "optimise.quantize.succeeded",
        "optimise.evaluation.succeeded",
        "model_version.create",
    } <= actions


def test_an_importance_matrix_computed_on_the_data_is_recorded(chain):
    q3 = chain.q3
    assert q3.quantization == "Q3_K_S" and list(q3.parents.all()) == [chain.f16]
    imatrix = q3.source["imatrix"]
    assert imatrix["sha256"] == chain.prose.sha256 and imatrix["dataset"] == "prose"
    assert imatrix["chunks"] == 2 and imatrix["n_ctx"] == 512
    assert imatrix["entries"] == 18 * 7  # every projection of the 18 blocks


def test_the_ml_bom_of_a_quantised_version_names_its_sources(chain):
    response = client_for(chain.cora).get(f"/api/v1/registry/versions/{chain.q4.pk}/bom.cdx.json")
    assert response.status_code == 200, response.content
    hashes = {h["content"] for c in response.json()["components"] for h in c.get("hashes", [])}
    assert {chain.f16.sha256, chain.gemma.sha256} <= hashes


def test_perplexity_and_kl_divergence_order_the_quantisations(chain):
    f16, q8, q4 = (chain.evaluations[k] for k in ("f16", "q8", "q4"))
    for e in (f16, q8, q4):
        assert e.dataset_sha256 == chain.prose.sha256
        assert 1 < e.perplexity < 1000 and e.perplexity_uncertainty > 0
        # 20 paragraphs make about ten 128-token chunks; the second half of each is scored.
        assert e.result["chunks"] >= 8 and e.result["n_ctx"] == 128
        assert e.result["tokens_scored"] == e.result["chunks"] * 63
    print(
        {
            k: (e.perplexity, e.perplexity_uncertainty, e.kl_divergence, e.top_token_agreement)
            for k, e in chain.evaluations.items()
        }
    )
    # Within the reported uncertainty: F16 ≤ Q8_0 ≤ Q4_0.
    assert f16.perplexity <= q8.perplexity + q8.perplexity_uncertainty
    assert q8.perplexity <= q4.perplexity + q4.perplexity_uncertainty
    # Against the F16 original, Q8_0 departs less than Q4_0, by any measure.
    assert 0 <= q8.kl_divergence < q4.kl_divergence
    assert q8.top_token_agreement > q4.top_token_agreement
    assert q8.result["reference_perplexity"] == pytest.approx(f16.perplexity, rel=1e-6)


def test_the_quantised_files_load_and_answer(chain):
    from llama_cpp import Llama

    for version in (chain.q8, chain.q4):
        path = artifact_store().verify(version.sha256)
        llm = Llama(model_path=str(path), n_ctx=128, verbose=False)
        answer = llm.create_completion("The harbour was quiet in the", max_tokens=8, temperature=0)
        assert answer["choices"][0]["text"].strip()
        llm.close()
    approved = model_version_approve(actor=chain.cora, version=chain.q4, reason="Evaluated.")
    model_version_deploy_check(version=approved)  # raises if it could not be deployed


def test_the_pages_show_the_figures_and_compare_the_versions(chain):
    client = client_for(chain.cora)
    panel = client.get(f"/optimise/versions/{chain.q4.pk}/", HTTP_HX_REQUEST="true")
    assert panel.status_code == 200
    text = panel.content.decode()
    assert "version-evaluations" in text and f"{chain.evaluations['q4'].perplexity:.3f}" in text
    # A compliance officer reads; she is not offered the actions.
    assert "quantize-form" not in text
    page = client.get("/optimise/compare/gemma-opt/").content.decode()
    assert page.count('class="point"') == 3
    for version in (chain.f16, chain.q8, chain.q4):
        assert version.get_absolute_url() in page
    detail = client.get(chain.evaluations["q8"].get_absolute_url()).content.decode()
    assert 'id="kl"' in detail and str(chain.f16) in detail
    body = client.get("/api/v1/optimise/compare/gemma-opt/").json()
    assert {row["quantization"] for row in body["rows"]} == {"F16", "Q8_0", "Q4_0"}
    dana_panel = client_for(chain.dana).get(f"/optimise/versions/{chain.f16.pk}/").content
    assert b"quantize-form" in dana_panel and b"evaluate-form" in dana_panel


def test_the_setup_advisor_ranks_quantisations_by_what_they_measured(chain):
    from apps.setups import advisor
    from apps.setups.selectors import quality_of

    versions = [chain.q4, chain.q8, chain.f16]
    quality = quality_of(versions)
    assert quality[chain.q4.pk].perplexity == chain.evaluations["q4"].perplexity
    ranked = advisor.advise(
        use_case="chat",
        experience="quality",
        versions=versions,
        workers=[],
        trials=[],
        quality=quality,
    )
    # One model, three files of one size in parameters: the lower perplexity ranks first.
    by_perplexity = sorted(versions, key=lambda v: quality[v.pk].perplexity)
    assert [c.version for c in ranked] == by_perplexity
    assert any("Measured quality: perplexity" in r for r in ranked[0].reasons)
    assert ranked[0].as_dict()["quality"]["dataset"] == str(chain.prose)
