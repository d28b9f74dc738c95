from __future__ import annotations

from django import forms

from apps.deployments.models import DEPLOYMENT_NAME
from apps.setups.models import Experience, Setup, UseCase


class AdviseForm(forms.Form):
    use_case = forms.ChoiceField(choices=UseCase.choices, initial=UseCase.CHAT)
    experience = forms.ChoiceField(choices=Experience.choices, initial=Experience.FAST)
    worker = forms.ChoiceField(required=False, label="Hardware")

    def __init__(self, *args, workers: list[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["worker"].choices = [("", "Any worker")] + [(w, w) for w in workers]


class ApplyForm(AdviseForm):
    model_version = forms.IntegerField(widget=forms.HiddenInput)
    action = forms.ChoiceField(choices=[("deploy", "Deploy"), ("trial", "Run a trial")])


class DeployForm(forms.Form):
    name = forms.CharField(
        max_length=100, validators=[DEPLOYMENT_NAME], label="Public name (the 'model' clients send)"
    )
    replicas = forms.IntegerField(min_value=1, max_value=16, initial=1)


class RecipeImportForm(forms.Form):
    file = forms.FileField(label="Recipe file (.yaml)")
    name = forms.CharField(
        max_length=100, required=False, help_text="Save it under another name (optional)."
    )


class SwitchForm(forms.Form):
    setup = forms.ModelChoiceField(queryset=Setup.objects.none(), label="Setup")
    stop_then_start = forms.BooleanField(
        required=False,
        label="Stop, then start (when the worker cannot hold both at once)",
        help_text="Serving stops while the new setup loads.",
    )

    def __init__(self, *args, setups=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["setup"].queryset = setups if setups is not None else Setup.objects.none()
