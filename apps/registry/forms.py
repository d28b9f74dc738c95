from django import forms

from apps.registry.models import REPO_NAME


class ModelRepoForm(forms.Form):
    name = forms.CharField(max_length=100, validators=[REPO_NAME], help_text="e.g. llama-3-8b")
    licence = forms.CharField(
        max_length=100, help_text="SPDX id (apache-2.0, mit, llama3…) or a named licence."
    )
    licence_url = forms.URLField(required=False, label="Licence URL", assume_scheme="https")
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False)
    tags = forms.CharField(required=False, help_text="Comma-separated.")

    def tag_list(self) -> list[str]:
        return [t.strip() for t in self.cleaned_data.get("tags", "").split(",") if t.strip()]


class ImportPathForm(forms.Form):
    path = forms.CharField(max_length=1000, help_text="A file under an allowed import directory.")


class HfImportForm(forms.Form):
    repo_id = forms.CharField(
        label="Repository", max_length=200, help_text="owner/name, e.g. google/gemma-3-270m"
    )
    filename = forms.CharField(
        label="File", max_length=1000, help_text="A .gguf file, with its folder in the repo if any."
    )
    revision = forms.CharField(
        max_length=200, required=False, help_text="Branch, tag or commit; main if empty."
    )


class ReasonForm(forms.Form):
    reason = forms.CharField(max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
