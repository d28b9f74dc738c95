from __future__ import annotations

from django import forms
from django.core.exceptions import ValidationError

from apps.datasets import selectors
from apps.datasets.models import Shape
from apps.datasets.services import parse_column_mapping
from apps.registry.forms import HfImportForm as RegistryHfImportForm
from apps.registry.models import REPO_NAME


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[REPO_NAME], help_text="e.g. support-chats")
    licence = forms.CharField(max_length=100, help_text="SPDX id (cc-by-4.0, mit…) or a name.")
    source = forms.CharField(
        max_length=2000, required=False, help_text="Where the data came from (system, export…)."
    )
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)


class UploadSettingsForm(forms.Form):
    """The fields that travel with an upload (the file itself is streamed separately)."""

    shape = forms.ChoiceField(
        choices=[("", "Detect from the rows"), *Shape.choices], required=False
    )
    column_mapping = forms.CharField(
        required=False,
        label="Column mapping",
        help_text="For CSV and Parquet: field=column, e.g. prompt=question, completion=answer.",
    )
    tokenizer = forms.ModelChoiceField(
        queryset=selectors.tokenizer_choices(),
        required=False,
        empty_label="Count characters",
        label="Count tokens with",
    )
    max_tokens = forms.IntegerField(
        min_value=1,
        required=False,
        label="Longest row (tokens)",
        help_text="Rows longer than this are errors; usually the fine-tune's sequence length.",
    )

    def clean_column_mapping(self) -> dict[str, str]:
        try:
            return parse_column_mapping(self.cleaned_data.get("column_mapping") or "")
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages) from exc


class SplitForm(forms.Form):
    validation_fraction = forms.FloatField(
        min_value=0.001, max_value=0.999, initial=0.1, label="Validation fraction"
    )
    seed = forms.IntegerField(initial=42, help_text="The same seed gives the same split.")


class FilterForm(forms.Form):
    drop_pii = forms.BooleanField(
        required=False, initial=True, label="Also drop rows with personal data"
    )


class HfImportForm(RegistryHfImportForm, UploadSettingsForm):
    """The dataset page's "Import from Hugging Face": a file of a dataset repo, and the
    settings an upload takes."""

    field_order = ["repo_id", "filename", "revision"]

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        help_texts = {
            "repo_id": "owner/name of a dataset repo, e.g. acme/support-chats",
            "filename": "A .jsonl, .csv or .parquet file, with its folder in the repo if any.",
        }
        for name, text in help_texts.items():
            self.fields[name].help_text = text
