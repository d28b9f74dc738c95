from __future__ import annotations

from django import forms

from apps.finetune import selectors
from apps.finetune.services import default_params
from workers.finetune.spec import LR_SCHEDULERS

DEFAULTS = default_params()


class LaunchForm(forms.Form):
    base_model = forms.ModelChoiceField(queryset=selectors.base_model_choices())
    dataset_version = forms.ModelChoiceField(queryset=None, label="Training data")
    validation_version = forms.ModelChoiceField(
        queryset=None, required=False, label="Validation data", empty_label="None"
    )
    output_repo = forms.CharField(
        max_length=100, required=False, help_text="Registry model for the adapters (optional)."
    )
    lora_rank = forms.IntegerField(min_value=1, max_value=256, initial=DEFAULTS["lora_rank"])
    lora_alpha = forms.FloatField(min_value=0.01, initial=DEFAULTS["lora_alpha"])
    lora_dropout = forms.FloatField(min_value=0, max_value=0.99, initial=DEFAULTS["lora_dropout"])
    target_modules = forms.CharField(
        initial=", ".join(DEFAULTS["target_modules"]), help_text="Comma-separated."
    )
    learning_rate = forms.FloatField(initial=DEFAULTS["learning_rate"])
    lr_scheduler = forms.ChoiceField(
        choices=[(s, s) for s in LR_SCHEDULERS], initial=DEFAULTS["lr_scheduler"]
    )
    warmup_steps = forms.IntegerField(min_value=0, initial=DEFAULTS["warmup_steps"])
    epochs = forms.FloatField(min_value=0.01, required=False, initial=DEFAULTS["epochs"])
    max_steps = forms.IntegerField(
        min_value=1, required=False, help_text="When set, it wins over epochs."
    )
    batch_size = forms.IntegerField(min_value=1, initial=DEFAULTS["batch_size"])
    gradient_accumulation = forms.IntegerField(
        min_value=1, initial=DEFAULTS["gradient_accumulation"]
    )
    max_seq_length = forms.IntegerField(min_value=16, initial=DEFAULTS["max_seq_length"])
    seed = forms.IntegerField(initial=DEFAULTS["seed"])
    checkpoint_every = forms.IntegerField(min_value=1, initial=DEFAULTS["checkpoint_every"])
    eval_every = forms.IntegerField(min_value=1, required=False)

    PARAMS = (
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "epochs",
        "max_steps",
        "batch_size",
        "gradient_accumulation",
        "max_seq_length",
        "seed",
        "checkpoint_every",
        "eval_every",
    )

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        versions = selectors.trainable_dataset_versions(user=user)
        self.fields["dataset_version"].queryset = versions
        self.fields["validation_version"].queryset = versions

    def params(self) -> dict:
        return {name: self.cleaned_data.get(name) for name in self.PARAMS}
