"""The ``aibox`` command line: the client's operations as subcommands.

Exit codes (docs/client.md) are part of the interface; scripts rely on them."""

from __future__ import annotations

import getpass
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from aibox_client.client import AIBox
from aibox_client.config import ConfigError, config_path, resolve_credentials, write_config
from aibox_client.errors import (
    AIBoxError,
    AuthenticationError,
    ConnectionFailed,
    JobFailed,
    MissingExtra,
    NotFound,
    PermissionDenied,
    VerificationFailed,
    error_for_status,
)

EXIT_OK = 0
EXIT_REFUSED = 1  # the box refused the request or failed (400, 409, 413, 429, 5xx)
EXIT_USAGE = 2  # bad arguments, no credentials, an unsafe config file, a missing extra
EXIT_AUTH = 3  # 401 or 403: no valid key, or its role or scopes do not allow it
EXIT_NOT_FOUND = 4  # 404
EXIT_CONNECTION = 5  # the box could not be reached, or an upload's connection kept dropping
EXIT_JOB_FAILED = 6  # a job waited for ended failed or cancelled (a dataset rejected)
EXIT_UNVERIFIED = 7  # a signed export did not verify


def exit_code(exc: AIBoxError) -> int:
    if isinstance(exc, ConfigError | MissingExtra):
        return EXIT_USAGE
    if isinstance(exc, AuthenticationError | PermissionDenied):
        return EXIT_AUTH
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, ConnectionFailed):
        return EXIT_CONNECTION
    if isinstance(exc, JobFailed):
        return EXIT_JOB_FAILED
    if isinstance(exc, VerificationFailed):
        return EXIT_UNVERIFIED
    return EXIT_REFUSED


@dataclass
class State:
    url: str | None
    api_key: str | None
    as_json: bool
    progress: bool | None
    _box: AIBox | None = field(default=None, repr=False)

    @property
    def box(self) -> AIBox:
        if self._box is None:
            self._box = AIBox.from_env(self.url, self.api_key, progress=self.progress)
        return self._box


class Group(click.Group):
    """Turns the client's exceptions into a message on stderr and a documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AIBoxError as exc:
            state = ctx.find_object(State)
            if state is not None and state.as_json:
                error = {"status": exc.status, "message": exc.message, "type": type(exc).__name__}
                if exc.fields:
                    error["fields"] = exc.fields
                if isinstance(exc, VerificationFailed):
                    error["problems"] = exc.problems
                click.echo(json.dumps({"error": error}), err=True)
            else:
                status = f" ({exc.status})" if exc.status else ""
                click.echo(f"Error{status}: {exc.message}", err=True)
            ctx.exit(exit_code(exc))


def emit(data: Any, columns: list[str] | None = None) -> None:
    """JSON with --json; otherwise a table of ``columns`` (lists) or key: value lines."""
    state = click.get_current_context().find_object(State)
    if state is not None and state.as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    if isinstance(data, list):
        columns = columns or (list(data[0]) if data else [])
        rows = [[_cell(item.get(c)) for c in columns] for item in data]
        widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
        click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return
    keys = columns or list(data)
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        click.echo(f"{key.ljust(width)}  {_cell(data.get(key), wide=True)}")


def _cell(value: Any, wide: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        text = json.dumps(value, default=str)
        return text if wide or len(text) <= 40 else text[:37] + "..."
    return str(value)


def _params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` options; a value that parses as JSON is taken as JSON (numbers,
    booleans, lists), anything else as a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value.")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


pass_state = click.make_pass_decorator(State)


@click.group(cls=Group)
@click.option(
    "--url", help="The box, e.g. http://box:8000 (default: $AIBOX_URL, then the config file)."
)
@click.option(
    "--api-key",
    help="An API key (default: $AIBOX_API_KEY, then the config file). "
    "On a shared machine prefer the environment: arguments show in process lists.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.version_option("0.1.0", prog_name="aibox")
@click.pass_context
def cli(ctx: click.Context, url, api_key, as_json, no_progress) -> None:
    """Script an AIBox from the terminal.

    \b
    Exit codes: 0 ok; 1 the box refused or failed (400, 409, 413, 429, 5xx);
    2 usage error, no credentials or an unsafe config file; 3 authentication or
    permission (401, 403); 4 not found (404); 5 the box unreachable or an upload's
    connection kept dropping; 6 a job waited for failed, was cancelled, or a dataset
    was rejected; 7 an audit export did not verify.
    """
    ctx.obj = State(url, api_key, as_json, False if no_progress or as_json else None)


# --- credentials --------------------------------------------------------------------


@cli.command()
@click.option("--url", "login_url", help="The box's URL (asked for when left out).")
@click.option("--api-key-stdin", is_flag=True, help="Read the key from standard input.")
@pass_state
def login(state: State, login_url: str | None, api_key_stdin: bool) -> None:
    """Check a key against the box and store it (mode 0600) for later commands."""
    url = login_url or state.url or click.prompt("AIBox URL")
    if api_key_stdin:
        key = sys.stdin.readline().strip()
    else:
        key = state.api_key or getpass.getpass("API key: ").strip()
    with AIBox(url, key, progress=False) as box:
        me = box.me()
    path = write_config(url, key)
    if state.as_json:
        emit({"config": str(path), **me})
    else:
        click.echo(
            f"Logged in to {url} as {me.get('username')} ({me.get('role')}); saved in {path}."
        )


@cli.command()
@pass_state
def whoami(state: State) -> None:
    """Who the key belongs to, and its scopes."""
    emit(state.box.me())


@cli.command("config-path")
def config_path_command() -> None:
    """Where the config file is (or would be)."""
    click.echo(str(config_path()))


@cli.command()
def env() -> None:
    """Which URL the credentials point at, and where they come from (never the key)."""
    credentials = resolve_credentials(
        click.get_current_context().find_object(State).url,
        click.get_current_context().find_object(State).api_key,
    )
    emit({"url": credentials.url, "source": credentials.source})


# --- models -------------------------------------------------------------------------

MODEL_COLUMNS = ["name", "licence", "owner", "tags"]
VERSION_COLUMNS = ["id", "repo", "number", "file_name", "size", "format", "state"]


@cli.group(cls=Group)
def models() -> None:
    """Models and their versions."""


@models.command("list")
@pass_state
def models_list(state: State) -> None:
    emit(state.box.models(), MODEL_COLUMNS)


@models.command("show")
@click.argument("name")
@pass_state
def models_show(state: State, name: str) -> None:
    model = state.box.model(name)
    if state.as_json:
        emit(model)
        return
    emit(model, ["name", "licence", "owner", "description", "tags"])
    click.echo()
    emit(model.get("versions", []), VERSION_COLUMNS)


@models.command("create")
@click.argument("name")
@click.option("--licence", required=True, help="An SPDX expression, e.g. apache-2.0.")
@click.option("--description", default="")
@click.option("--tag", "tags", multiple=True)
@pass_state
def models_create(state: State, name: str, licence: str, description: str, tags) -> None:
    emit(state.box.create_model(name, licence=licence, description=description, tags=list(tags)))


@models.command("upload")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_state
def models_upload(state: State, name: str, file: Path) -> None:
    """Upload a .gguf file as a new version of NAME."""
    emit(state.box.upload_model_version(name, file), VERSION_COLUMNS)


@models.command("import-hf")
@click.argument("name")
@click.argument("repo_id")
@click.argument("filename")
@click.option("--revision", default="")
@click.option("--wait/--no-wait", default=False, help="Follow the download until it ends.")
@pass_state
def models_import_hf(state: State, name, repo_id, filename, revision, wait) -> None:
    """Import FILENAME of the Hugging Face repo REPO_ID into NAME."""
    job = state.box.import_model_hf(
        name, repo_id=repo_id, filename=filename, revision=revision, wait=wait
    )
    emit(job, ["id", "state", "repo_id", "filename", "bytes_done", "version", "reason"])


@models.command("version")
@click.argument("id", type=int)
@pass_state
def models_version(state: State, id: int) -> None:
    """One version: sha256, size, metadata, state."""
    emit(state.box.model_version(id))


@models.command("approve")
@click.argument("id", type=int)
@click.option("--reason", required=True)
@pass_state
def models_approve(state: State, id: int, reason: str) -> None:
    emit(state.box.approve_version(id, reason=reason), VERSION_COLUMNS)


@models.command("deprecate")
@click.argument("id", type=int)
@click.option("--reason", required=True)
@pass_state
def models_deprecate(state: State, id: int, reason: str) -> None:
    emit(state.box.deprecate_version(id, reason=reason), VERSION_COLUMNS)


# --- datasets -----------------------------------------------------------------------

DATASET_VERSION_COLUMNS = [
    "id",
    "dataset",
    "number",
    "file_name",
    "shape",
    "state",
    "rows",
    "valid_rows",
    "error_count",
]


@cli.group(cls=Group)
def datasets() -> None:
    """Datasets, their versions, validation reports and rows."""


@datasets.command("list")
@pass_state
def datasets_list(state: State) -> None:
    emit(state.box.datasets(), ["name", "licence", "owner", "source"])


@datasets.command("show")
@click.argument("name")
@pass_state
def datasets_show(state: State, name: str) -> None:
    dataset = state.box.dataset(name)
    if state.as_json:
        emit(dataset)
        return
    emit(dataset, ["name", "licence", "owner", "source", "description"])
    click.echo()
    emit(dataset.get("versions", []), DATASET_VERSION_COLUMNS)


@datasets.command("create")
@click.argument("name")
@click.option("--licence", required=True)
@click.option("--source", default="")
@click.option("--description", default="")
@pass_state
def datasets_create(state: State, name, licence, source, description) -> None:
    emit(state.box.create_dataset(name, licence=licence, source=source, description=description))


@datasets.command("upload")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["chat", "instruction", "prompt_completion", "text"]))
@click.option("--column-mapping", help='JSON, e.g. \'{"prompt": "question"}\'.')
@click.option("--tokenizer", type=int, help="A GGUF model version id to count tokens with.")
@click.option("--max-tokens", type=int)
@click.option("--wait/--no-wait", default=False, help="Wait for the validation's verdict.")
@pass_state
def datasets_upload(state: State, name, file, shape, column_mapping, tokenizer, max_tokens, wait):
    """Upload FILE (.jsonl, .csv, .parquet) as a new version of NAME."""
    try:
        mapping = json.loads(column_mapping) if column_mapping else None
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--column-mapping") from exc
    version = state.box.upload_dataset_version(
        name,
        file,
        shape=shape,
        column_mapping=mapping,
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        wait=wait,
    )
    emit(version, DATASET_VERSION_COLUMNS + ["state_reason"])


@datasets.command("version")
@click.argument("id", type=int)
@pass_state
def datasets_version(state: State, id: int) -> None:
    """A version and its validation report."""
    version = state.box.dataset_version(id)
    if state.as_json:
        emit(version)
        return
    emit(version, [*DATASET_VERSION_COLUMNS, "state_reason", "pii_rows", "duplicate_rows"])
    errors = (version.get("report") or {}).get("errors") or []
    if errors:
        click.echo("\nErrors:")
        emit(errors[:20], ["line", "code", "message"])


@datasets.command("rows")
@click.argument("id", type=int)
@click.option("--start", type=int, default=0)
@click.option("--count", type=int, default=20)
@pass_state
def datasets_rows(state: State, id: int, start: int, count: int) -> None:
    """Rows of a version as read from its file (invalid ones with their error)."""
    rows = state.box.dataset_rows(id, start=start, count=count)
    if state.as_json:
        emit(rows)
        return
    emit(rows["rows"], ["number", "line", "shape", "error", "row"])


@datasets.command("derive")
@click.argument("id", type=int)
@click.argument("operation", type=click.Choice(["split", "dedupe", "filter"]))
@click.option("--param", "params", multiple=True, help="key=value, e.g. validation_fraction=0.2")
@click.option("--wait/--no-wait", default=False)
@pass_state
def datasets_derive(state: State, id: int, operation: str, params, wait: bool) -> None:
    """Derive new versions from version ID."""
    job = state.box.derive_dataset_version(id, operation, _params(params), wait=wait)
    emit(job, ["id", "operation", "state", "reason", "outputs"])


@datasets.command("import-hf")
@click.argument("name")
@click.argument("repo_id")
@click.argument("filename")
@click.option("--revision", default="")
@click.option("--shape", type=click.Choice(["chat", "instruction", "prompt_completion", "text"]))
@click.option("--wait/--no-wait", default=False)
@pass_state
def datasets_import_hf(state: State, name, repo_id, filename, revision, shape, wait) -> None:
    job = state.box.import_dataset_hf(
        name, repo_id=repo_id, filename=filename, revision=revision, shape=shape, wait=wait
    )
    emit(job, ["id", "state", "repo_id", "filename", "bytes_done", "version", "reason"])


# --- fine-tunes ---------------------------------------------------------------------

FINETUNE_COLUMNS = [
    "id",
    "name",
    "state",
    "step",
    "max_steps",
    "train_loss",
    "validation_loss",
    "adapter",
    "reason",
]


@cli.group(cls=Group)
def finetunes() -> None:
    """LoRA fine-tunes."""


@finetunes.command("list")
@pass_state
def finetunes_list(state: State) -> None:
    emit(state.box.finetunes(), FINETUNE_COLUMNS)


@finetunes.command("show")
@click.argument("id", type=int)
@pass_state
def finetunes_show(state: State, id: int) -> None:
    job = state.box.finetune(id)
    emit(job, None if state.as_json else [*FINETUNE_COLUMNS, "params", "worker", "result"])


@finetunes.command("create")
@click.option("--base-model", type=int, required=True, help="A model version id.")
@click.option("--dataset-version", type=int, required=True)
@click.option("--validation-version", type=int)
@click.option("--param", "params", multiple=True, help="key=value, e.g. max_steps=20")
@click.option("--name", default="")
@click.option("--output-repo", default="")
@click.option("--follow", is_flag=True, help="Follow its progress until it ends.")
@pass_state
def finetunes_create(
    state: State, base_model, dataset_version, validation_version, params, name, output_repo, follow
) -> None:
    """Queue a fine-tune of BASE_MODEL on DATASET_VERSION."""
    job = state.box.create_finetune(
        base_model=base_model,
        dataset_version=dataset_version,
        validation_version=validation_version,
        params=_params(params),
        name=name,
        output_repo=output_repo,
    )
    if follow:
        job = state.box.follow(job["id"])
    emit(job, FINETUNE_COLUMNS)


@finetunes.command("follow")
@click.argument("id", type=int)
@pass_state
def finetunes_follow(state: State, id: int) -> None:
    """Follow a fine-tune until it ends (exit 6 when it fails or is cancelled)."""
    emit(state.box.follow(id), FINETUNE_COLUMNS)


@finetunes.command("cancel")
@click.argument("id", type=int)
@pass_state
def finetunes_cancel(state: State, id: int) -> None:
    emit(state.box.cancel_finetune(id), FINETUNE_COLUMNS)


@finetunes.command("retry")
@click.argument("id", type=int)
@pass_state
def finetunes_retry(state: State, id: int) -> None:
    emit(state.box.retry_finetune(id), FINETUNE_COLUMNS)


# --- optimise: quantisation, export, evaluation -----------------------------------------

JOB_COLUMNS = ["id", "operation", "source", "state", "progress", "output_version", "reason"]
EVALUATION_COLUMNS = [
    "id",
    "model_version",
    "adapter",
    "dataset_version",
    "state",
    "perplexity",
    "exact_match",
    "reason",
]


@cli.group(cls=Group)
def optimise() -> None:
    """Quantise and export model versions; list the jobs."""


@optimise.command("list")
@pass_state
def optimise_list(state: State) -> None:
    emit(state.box.optimise_jobs(), JOB_COLUMNS)


@optimise.command("show")
@click.argument("id", type=int)
@pass_state
def optimise_show(state: State, id: int) -> None:
    emit(state.box.optimise_job(id))


@optimise.command("quantize")
@click.argument("source", type=int)
@click.argument("quant_type")
@click.option("--allow-requantize", is_flag=True)
@click.option("--output-repo", default="")
@click.option("--wait/--no-wait", default=False)
@pass_state
def optimise_quantize(state: State, source, quant_type, allow_requantize, output_repo, wait):
    """Quantise model version SOURCE to QUANT_TYPE (e.g. Q4_K_M)."""
    job = state.box.quantize(
        source, quant_type, allow_requantize=allow_requantize, output_repo=output_repo, wait=wait
    )
    emit(job, JOB_COLUMNS)


@optimise.command("export")
@click.argument("source", type=int)
@click.option("--adapter", type=int, help="A LoRA adapter version to merge in.")
@click.option("--out-type", type=click.Choice(["f16", "bf16"]), default="f16")
@click.option("--output-repo", default="")
@click.option("--wait/--no-wait", default=False)
@pass_state
def optimise_export(state: State, source, adapter, out_type, output_repo, wait) -> None:
    job = state.box.export_model(
        source, adapter=adapter, out_type=out_type, output_repo=output_repo, wait=wait
    )
    emit(job, JOB_COLUMNS)


@cli.group(cls=Group)
def evaluations() -> None:
    """Evaluations of model versions (perplexity, KL divergence, task scores)."""


@evaluations.command("list")
@click.option("--model-version", type=int)
@pass_state
def evaluations_list(state: State, model_version: int | None) -> None:
    emit(state.box.evaluations(model_version=model_version), EVALUATION_COLUMNS)


@evaluations.command("show")
@click.argument("id", type=int)
@pass_state
def evaluations_show(state: State, id: int) -> None:
    emit(state.box.evaluation(id))


@evaluations.command("create")
@click.argument("model_version", type=int)
@click.argument("dataset_version", type=int)
@click.option("--adapter", type=int)
@click.option("--reference", type=int)
@click.option("--max-chunks", type=int)
@click.option("--max-items", type=int)
@click.option("--wait/--no-wait", default=False)
@pass_state
def evaluations_create(
    state: State, model_version, dataset_version, adapter, reference, max_chunks, max_items, wait
):
    evaluation = state.box.evaluate(
        model_version,
        dataset_version,
        adapter=adapter,
        reference=reference,
        max_chunks=max_chunks,
        max_items=max_items,
        wait=wait,
    )
    emit(evaluation, EVALUATION_COLUMNS)


# --- deployments ----------------------------------------------------------------------

DEPLOYMENT_COLUMNS = [
    "name",
    "model",
    "model_version",
    "adapter",
    "state",
    "replicas",
    "revision",
    "state_reason",
]
REVISION_COLUMNS = ["number", "state", "label", "model_version", "adapter", "reason"]


@cli.group(cls=Group)
def deployments() -> None:
    """Deployments: list, show, create, start/stop/restart, scale, switch, rollback."""


@deployments.command("list")
@pass_state
def deployments_list(state: State) -> None:
    emit(state.box.deployments(), DEPLOYMENT_COLUMNS)


@deployments.command("show")
@click.argument("name")
@pass_state
def deployments_show(state: State, name: str) -> None:
    deployment = state.box.deployment(name)
    if state.as_json:
        emit(deployment)
        return
    emit(deployment, [*DEPLOYMENT_COLUMNS, "context_length", "sha256"])
    click.echo("\nRevisions:")
    emit(deployment.get("revisions", []), REVISION_COLUMNS)


@deployments.command("create")
@click.argument("name")
@click.option("--model-version", type=int, required=True)
@click.option("--adapter", type=int, help="A LoRA adapter version served on top.")
@click.option("--set", "settings", multiple=True, help="key=value, e.g. context_length=512")
@click.option("--wait/--no-wait", default=False, help="Wait until it is ready.")
@pass_state
def deployments_create(state: State, name, model_version, adapter, settings, wait) -> None:
    deployment = state.box.create_deployment(
        name, model_version=model_version, adapter=adapter, wait=wait, **_params(settings)
    )
    emit(deployment, DEPLOYMENT_COLUMNS)


def _lifecycle(action: str):
    @deployments.command(action, help=f"{action.capitalize()} the deployment NAME.")
    @click.argument("name")
    @pass_state
    def command(state: State, name: str) -> None:
        emit(getattr(state.box, f"{action}_deployment")(name), DEPLOYMENT_COLUMNS)

    return command


for _action in ("start", "stop", "restart"):
    _lifecycle(_action)


@deployments.command("scale")
@click.argument("name")
@click.argument("replicas", type=int)
@pass_state
def deployments_scale(state: State, name: str, replicas: int) -> None:
    emit(state.box.scale_deployment(name, replicas), DEPLOYMENT_COLUMNS)


@deployments.command("switch")
@click.argument("name")
@click.option("--model-version", type=int)
@click.option("--adapter", help="An adapter version id, or 'none' to serve without one.")
@click.option("--set", "settings", multiple=True, help="key=value: a setting that changes")
@click.option("--label", default="")
@click.option("--stop-then-start", is_flag=True)
@pass_state
def deployments_switch(
    state: State, name, model_version, adapter, settings, label, stop_then_start
):
    """A new revision of NAME (loads beside the serving one, then takes the traffic)."""
    values = _params(settings)
    if adapter is not None:
        values["adapter"] = None if adapter.lower() == "none" else int(adapter)
    revision = state.box.switch_deployment(
        name,
        model_version=model_version,
        settings=values,
        label=label,
        stop_then_start=stop_then_start,
    )
    emit(revision, REVISION_COLUMNS)


@deployments.command("rollback")
@click.argument("name")
@click.argument("revision", type=int)
@pass_state
def deployments_rollback(state: State, name: str, revision: int) -> None:
    emit(state.box.rollback_deployment(name, revision), REVISION_COLUMNS)


@cli.command()
@pass_state
def workers(state: State) -> None:
    """Workers from their heartbeats."""
    emit(state.box.workers(), ["hostname", "online", "pool", "cpu_cores", "ram_available_mib"])


@cli.group(cls=Group)
def setups() -> None:
    """Setups: list, show, switch a deployment to one."""


@setups.command("list")
@pass_state
def setups_list(state: State) -> None:
    emit(state.box.setups(), ["name", "use_case", "experience", "model_version"])


@setups.command("show")
@click.argument("name")
@pass_state
def setups_show(state: State, name: str) -> None:
    emit(state.box.setup(name))


@setups.command("switch")
@click.argument("setup")
@click.option("--deployment", required=True)
@click.option("--stop-then-start", is_flag=True)
@pass_state
def setups_switch(state: State, setup: str, deployment: str, stop_then_start: bool) -> None:
    """Switch DEPLOYMENT to run SETUP."""
    revision = state.box.switch_setup(setup, deployment=deployment, stop_then_start=stop_then_start)
    emit(revision, REVISION_COLUMNS)


# --- usage ------------------------------------------------------------------------------


@cli.command()
@click.option("--daily", is_flag=True, help="Totals and tokens per UTC day.")
@click.option("--days", type=int, help="With --daily: how many days (default 30).")
@click.option("--limit", type=int, default=50, help="How many records (newest first).")
@click.option("--deployment", help="Only this deployment's requests.")
@pass_state
def usage(state: State, daily: bool, days: int | None, limit: int, deployment: str | None):
    """Inference usage: own, or everyone's for admins and compliance officers."""
    if daily:
        report = state.box.usage_daily(days=days, deployment=deployment)
        if state.as_json:
            emit(report)
            return
        emit(report["days"], ["day", "requests", "errors", "prompt_tokens", "completion_tokens"])
        return
    records = state.box.usage(limit=limit, deployment=deployment)
    emit(
        records,
        [
            "created_at",
            "username",
            "deployment_name",
            "endpoint",
            "prompt_tokens",
            "completion_tokens",
            "latency_ms",
            "outcome",
        ],
    )


# --- audit ------------------------------------------------------------------------------


@cli.group(cls=Group)
def audit() -> None:
    """The audit log: events, signed exports and their verification."""


AUDIT_FILTERS = (
    "since",
    "until",
    "actor",
    "action",
    "target_type",
    "target_id",
    "target",
    "outcome",
    "text",
)


def _audit_filters(function):
    for name in reversed(AUDIT_FILTERS):
        function = click.option(f"--{name.replace('_', '-')}", name, help=f"Filter: {name}")(
            function
        )
    return function


@audit.command("events")
@_audit_filters
@click.option("--limit", type=int, default=50)
@pass_state
def audit_events(state: State, limit: int, **filters: Any) -> None:
    """Audit events, newest first."""
    events = state.box.audit_events(limit=limit, **filters)
    emit(events, ["seq", "created_at", "actor_label", "action", "target_label", "outcome"])


@audit.command("public-key")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def audit_public_key(state: State, output: Path | None) -> None:
    """The box's audit signing key (PEM) and its fingerprint."""
    key = state.box.audit_public_key()
    if output is not None:
        output.write_text(key["pem"])
    if state.as_json:
        emit(key)
    else:
        click.echo(f"fingerprint: {key['fingerprint']}")
        if output is None:
            click.echo(key["pem"].rstrip())


@audit.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "pdf"]), default="jsonl")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--verify", is_flag=True, help="Check the signature, content hash and chain.")
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The box's public key (PEM) taken earlier over a channel you trust; "
    "without it --verify fetches the box's key and prints its fingerprint to compare.",
)
@_audit_filters
@pass_state
def audit_export(state: State, fmt: str, output: Path, verify: bool, public_key, **filters) -> None:
    """Download a signed export of the (filtered) audit log to OUTPUT."""
    data = state.box.audit_export(output, format=fmt, **filters)
    result: dict[str, Any] = {"output": str(output), "bytes": len(data), "format": fmt}
    if verify:
        pem = public_key.read_bytes() if public_key else None
        verification = state.box.verify_audit_export(data, pem)
        result |= {
            "verified": verification.ok,
            "events": verification.events,
            "fingerprint": verification.fingerprint,
            "key_source": "file" if public_key else "fetched from the box",
            "problems": verification.problems,
        }
        if not verification.ok:
            if not state.as_json:
                emit(result, ["output", "format", "events", "fingerprint", "key_source"])
            raise VerificationFailed(verification.problems)
    emit(result)


@audit.command("verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
def audit_verify(file: Path, public_key: Path) -> None:
    """Verify an export offline against a public key file (no box needed)."""
    from aibox_client.verify import verify_export

    verification = verify_export(file.read_bytes(), public_key.read_bytes())
    emit(
        {
            "verified": verification.ok,
            "format": verification.format,
            "events": verification.events,
            "fingerprint": verification.fingerprint,
            "problems": verification.problems,
        }
    )
    if not verification.ok:
        raise VerificationFailed(verification.problems)


# --- inference ------------------------------------------------------------------------


@cli.command()
@click.argument("deployment")
@click.argument("message")
@click.option("--max-tokens", type=int, default=128)
@click.option("--temperature", type=float)
@pass_state
def chat(state: State, deployment: str, message: str, max_tokens: int, temperature) -> None:
    """Send MESSAGE to DEPLOYMENT through OpenAI's client; print the answer."""
    client = state.box.openai(deployment)  # MissingExtra first when openai is absent
    import openai

    try:
        answer = client.chat.completions.create(
            model=deployment,
            messages=[{"role": "user", "content": message}],
            max_tokens=max_tokens,
            **({"temperature": temperature} if temperature is not None else {}),
        )
    except openai.APIStatusError as exc:
        raise error_for_status(exc.status_code, str(exc.message)) from exc
    if state.as_json:
        emit(answer.model_dump())
    else:
        click.echo(answer.choices[0].message.content)


def main() -> None:
    cli(prog_name="aibox")


if __name__ == "__main__":
    main()
