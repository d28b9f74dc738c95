from __future__ import annotations

from django import forms

from apps.optimise import selectors
from apps.optimise.services import EXPORT_TYPES, OFFERED_QUANT_TYPES

QUANT_HELP = {
    "Q8_0": "8.5 bits per weight: nearly lossless, half of F16",
    "Q6_K": "6.6 bits: very close to F16",
    "Q5_K_M": "5.7 bits: small loss, the usual choice with memory to spare",
    "Q4_K_M": "4.9 bits: the common default, moderate loss",
    "Q4_0": "4.5 bits: simple and fast on CPUs, more loss than Q4_K_M",
    "Q3_K_M": "3.9 bits: noticeable loss, for tight memory",
    "Q2_K": "3 bits: large loss; last resort",
}


class QuantizeForm(forms.Form):
    # Three forms share the version's panel: ids of their own, the same field names.
    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, auto_id="quantize_%s", **kwargs)
        self.fields["imatrix_dataset"].queryset = selectors.text_dataset_versions(user=user)

    quant_type = forms.ChoiceField(
        choices=[
            (t, f"{t} — {QUANT_HELP[t]}" if t in QUANT_HELP else t) for t in OFFERED_QUANT_TYPES
        ],
        initial="Q4_K_M",
        label="Quantisation type",
    )
    allow_requantize = forms.BooleanField(
        required=False,
        label="Requantise",
        help_text="The source is already quantised: quantise it again anyway (more loss).",
    )
    output_repo = forms.CharField(
        max_length=100,
        required=False,
        help_text="Registry model for the result (default: this one).",
    )
    imatrix_dataset = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label="None",
        label="Importance matrix from",
        help_text="Plain-text data like what the model will read: the rounding favours the "
        "weights that matter on it (needed for IQ2_XS and IQ2_XXS).",
    )
    imatrix_chunks = forms.IntegerField(
        initial=32,
        min_value=1,
        max_value=10_000,
        required=False,
        label="Importance matrix chunks (512 tokens each)",
    )


class ExportForm(forms.Form):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, auto_id="export_%s", **kwargs)

    adapter = forms.ModelChoiceField(
        queryset=selectors.lora_adapters(),
        required=False,
        empty_label="None: export the model alone",
        help_text="A LoRA adapter trained on this model, merged into the weights.",
    )
    out_type = forms.ChoiceField(choices=[(t, t.upper()) for t in EXPORT_TYPES], initial="f16")
    adapter_scale = forms.FloatField(initial=1.0, min_value=0.01, max_value=4)
    output_repo = forms.CharField(
        max_length=100,
        required=False,
        help_text="Registry model for the result (default: this one, or '<adapter>-merged').",
    )


class EvaluateForm(forms.Form):
    dataset_version = forms.ModelChoiceField(queryset=None, label="Data")
    adapter = forms.ModelChoiceField(
        queryset=selectors.lora_adapters(), required=False, empty_label="None"
    )
    reference = forms.ModelChoiceField(
        queryset=selectors.gguf_models(),
        required=False,
        empty_label="None",
        help_text="Text data only: compare token distributions (KL divergence) with this "
        "model, e.g. the unquantised one.",
    )
    n_ctx = forms.IntegerField(
        initial=512, min_value=64, max_value=32768, label="Context per chunk (perplexity)"
    )
    max_chunks = forms.IntegerField(initial=100, min_value=1, max_value=10_000)
    max_items = forms.IntegerField(
        initial=200, min_value=1, max_value=10_000, label="Rows at most (task score)"
    )

    def __init__(self, *args, user, **kwargs) -> None:
        super().__init__(*args, auto_id="evaluate_%s", **kwargs)
        self.fields["dataset_version"].queryset = selectors.evaluable_dataset_versions(user=user)
