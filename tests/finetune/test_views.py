"""The fine-tune pages as a user meets them: the launch form, its estimate, its errors."""

from __future__ import annotations

import pytest

from apps.accounts.models import Role
from apps.finetune.models import FineTuneJob
from tests.conftest import client_for

pytestmark = pytest.mark.django_db(transaction=True)


def _form(gemma, version, **overrides) -> dict:
    return {
        "base_model": gemma.pk,
        "dataset_version": version.pk,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "q_proj, v_proj",
        "learning_rate": 2e-4,
        "lr_scheduler": "linear",
        "warmup_steps": 0,
        "epochs": 1,
        "batch_size": 1,
        "gradient_accumulation": 1,
        "max_seq_length": 256,
        "seed": 42,
        "checkpoint_every": 50,
        **overrides,
    }


def test_the_launch_form_estimates_and_explains_what_it_refuses(users, gemma, train_version):
    dana = client_for(users[Role.DATA_SCIENTIST])
    page = dana.get(f"/finetunes/?dataset_version={train_version.pk}")
    assert page.status_code == 200
    assert b"Launch a fine-tune" in page.content

    estimate = dana.get("/finetunes/estimate", _form(gemma, train_version), HTTP_HX_REQUEST="true")
    assert estimate.status_code == 200
    assert b"data-estimate" in estimate.content and b"8 steps" in estimate.content

    refused = dana.post("/finetunes/", _form(gemma, train_version, target_modules="q_proj, wq"))
    assert refused.status_code == 200
    assert "Unknown target module for gemma3: wq" in refused.content.decode()
    assert not FineTuneJob.objects.exists()


def test_app_developers_do_not_see_fine_tunes(users):
    assert client_for(users[Role.APP_DEVELOPER]).get("/finetunes/").status_code == 403
