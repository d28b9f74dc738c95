"""``AIBox``: the REST API (docs/api.md) as typed methods. Results are the API's JSON as
TypedDicts (aibox_client.types); refusals are exceptions carrying the server's message
(aibox_client.errors). Inference is OpenAI's own client, configured by ``openai()``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import httpx
from tqdm.auto import tqdm

from aibox_client import types as t
from aibox_client.config import resolve_credentials
from aibox_client.errors import (
    AIBoxError,
    ConnectionFailed,
    JobFailed,
    MissingExtra,
    UploadInterrupted,
    error_from_response,
)
from aibox_client.follow import JobProgress, in_notebook
from aibox_client.uploads import MultipartFile
from aibox_client.verify import Verification, verify_export

__all__ = ["AIBox"]

USER_AGENT = "aibox-client/0.1.0"
FINISHED = ("succeeded", "failed", "cancelled")


def _segment(name: str) -> str:
    return quote(str(name), safe="")


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class AIBox:
    """A connection to one box.

    ``AIBox("http://box:8000", "aibox_...")``, or ``AIBox.from_env()`` to read
    ``AIBOX_URL``/``AIBOX_API_KEY`` or the file ``aibox login`` writes.

    ``upload_retries``: how many times an upload whose connection drops while the file is
    being sent starts again from the first byte (the box keeps nothing of a dropped
    upload). ``progress``: show bars for uploads and jobs (default: when on a terminal
    or in a notebook, as tqdm decides).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        upload_retries: int = 3,
        progress: bool | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.upload_retries = upload_retries
        self.progress = progress
        self.poll_interval = poll_interval
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    @classmethod
    def from_env(cls, url: str | None = None, api_key: str | None = None, **kwargs: Any) -> AIBox:
        """Credentials from the arguments, the environment, or the config file."""
        credentials = resolve_credentials(url, api_key)
        return cls(credentials.url, credentials.api_key, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AIBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AIBox({self.base_url!r})"

    # --- HTTP ---------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(
                f"Could not reach the box at {self.base_url} ({method} {path}): "
                f"{exc or type(exc).__name__}"
            ) from exc
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def _get(self, path: str, **params: Any) -> Any:
        return self._send("GET", path, params=_drop_none(params)).json()

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._send("POST", path, json=body if body is not None else {}).json()

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> Iterator[Any]:
        """Items of a cursor-paginated list, following ``next`` up to ``limit`` items."""
        url: str | None = path
        given = 0
        query: dict[str, Any] | None = _drop_none(params)
        while url:
            page = self._send("GET", url, params=query).json()
            query = None  # ``next`` carries the query
            for item in page["results"]:
                if limit is not None and given >= limit:
                    return
                given += 1
                yield item
            url = page.get("next")

    def _show(self) -> bool:
        if self.progress is not None:
            return self.progress
        # By default, bars only where someone watches: a terminal or a notebook.
        return in_notebook() or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())

    def _wait(
        self,
        fetch: Callable[[], dict[str, Any]],
        *,
        done: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float | None,
        update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            item = fetch()
            if update is not None:
                update(item)
            if done(item):
                return item
            if deadline is not None and time.monotonic() > deadline:
                raise AIBoxError(
                    f"Gave up waiting for {what} after {timeout:g} s "
                    f"(still {item.get('state')}); it goes on on the box."
                )
            time.sleep(self.poll_interval)

    @staticmethod
    def _check_finished(job: dict[str, Any], what: str) -> dict[str, Any]:
        if job.get("state") in ("failed", "cancelled", "rejected"):
            reason = job.get("reason") or job.get("state_reason") or "no reason given"
            raise JobFailed(f"{what} {job['state']}: {reason}", job=job)
        return job

    def _upload(
        self, path: str, file: str | Path, fields: dict[str, str], progress: bool | None
    ) -> tuple[int, Any]:
        """POST ``file`` as multipart; (status, body). Starts again from the first byte,
        up to ``upload_retries`` times, when the connection drops before the box answers;
        a box that took the whole file but answers too late is reported, not retried,
        since it may store it (a dataset would then get two versions)."""
        body = MultipartFile(Path(file), fields)
        show = self._show() if progress is None else progress
        attempts = self.upload_retries + 1
        for attempt in range(1, attempts + 1):
            sent = 0

            def advanced(n: int, bar: tqdm) -> None:
                nonlocal sent
                sent += n
                bar.update(n)

            with tqdm(
                total=body.file_size,
                desc=f"Uploading {body.path.name}"
                + (f" (try {attempt} of {attempts})" if attempt > 1 else ""),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not show,
                leave=True,
            ) as bar:
                try:
                    response = self._http.post(
                        path,
                        content=body.body(lambda n, bar=bar: advanced(n, bar)),
                        headers={
                            "Content-Type": body.content_type,
                            "Content-Length": str(body.length),
                        },
                        timeout=httpx.Timeout(600.0, connect=10.0),
                    )
                except httpx.ReadTimeout as exc:
                    # Everything went out and the box is still at it: sending it again
                    # could store it twice (a dataset would get two versions).
                    raise UploadInterrupted(
                        f"The box at {self.base_url} did not answer within 600 s after "
                        f"{body.path.name} was sent; it may still store it. Look before "
                        "sending it again.",
                        attempts=attempt,
                        sent=sent,
                        total=body.file_size,
                    ) from exc
                except httpx.TransportError as exc:
                    # No answer came: the box keeps nothing of a request it never finished
                    # reading, so the file goes again from its first byte.
                    if attempt == attempts:
                        cause = str(exc) or type(exc).__name__
                        raise UploadInterrupted(
                            f"Uploading {body.path.name} to {self.base_url} failed {attempts} "
                            f"time(s): the connection dropped after {sent:,} of "
                            f"{body.file_size:,} bytes had been handed to it ({cause}). "
                            "Nothing was stored; check the network (or a proxy's upload "
                            "limit) and try again.",
                            attempts=attempt,
                            sent=sent,
                            total=body.file_size,
                        ) from exc
                    time.sleep(min(2 ** (attempt - 1), 10))
                    continue
            if response.status_code >= 400:
                raise error_from_response(response)
            return response.status_code, response.json()
        raise AssertionError("unreachable")

    # --- who am I -------------------------------------------------------------------

    def me(self) -> t.Me:
        """The key's owner, role, and the key's prefix and scopes."""
        return cast(t.Me, self._get("/api/v1/me"))

    # --- models ---------------------------------------------------------------------

    def models(self) -> list[t.Model]:
        return cast(list[t.Model], self._get("/api/v1/registry/repos/"))

    def model(self, name: str) -> t.Model:
        """A model and all its versions."""
        return cast(t.Model, self._get(f"/api/v1/registry/repos/{_segment(name)}/"))

    def create_model(
        self,
        name: str,
        *,
        licence: str,
        licence_url: str = "",
        description: str = "",
        tags: list[str] | None = None,
    ) -> t.Model:
        body = {"name": name, "licence": licence, "licence_url": licence_url}
        body |= {"description": description, "tags": tags or []}
        return cast(t.Model, self._post("/api/v1/registry/repos/", body))

    def upload_model_version(
        self, model: str, file: str | Path, *, progress: bool | None = None
    ) -> t.ModelVersion:
        """Upload a ``.gguf`` file, streamed from disk; an identical file already stored
        answers its existing version."""
        _, body = self._upload(
            f"/api/v1/registry/repos/{_segment(model)}/versions/", file, {}, progress
        )
        return cast(t.ModelVersion, body)

    def import_model_hf(
        self,
        model: str,
        *,
        repo_id: str,
        filename: str,
        revision: str = "",
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.HubImport:
        """Queue a download of a GGUF file from Hugging Face into ``model``; ``wait``
        polls it until it ends (a failed import raises JobFailed with the reason)."""
        body = {"repo_id": repo_id, "filename": filename, "revision": revision}
        job = self._post(f"/api/v1/registry/repos/{_segment(model)}/import-hf", body)
        if wait:
            job = self.wait_model_import(job["id"], timeout=timeout)
        return cast(t.HubImport, job)

    def model_import(self, id: int) -> t.HubImport:
        return cast(t.HubImport, self._get(f"/api/v1/registry/imports/{int(id)}/"))

    def wait_model_import(self, id: int, *, timeout: float | None = None) -> t.HubImport:
        return cast(t.HubImport, self._wait_bytes(lambda: self.model_import(id), timeout))

    def _wait_bytes(self, fetch: Callable[[], Any], timeout: float | None) -> dict[str, Any]:
        with tqdm(unit="B", unit_scale=True, desc="Importing", disable=not self._show()) as bar:

            def update(job: dict[str, Any]) -> None:
                bar.total = job.get("bytes_total") or bar.total
                bar.n = job.get("bytes_done") or 0
                bar.refresh()

            job = self._wait(
                fetch,
                done=lambda j: j["state"] in FINISHED,
                what="the import",
                timeout=timeout,
                update=update,
            )
        return self._check_finished(job, "The import")

    def model_version(self, id: int) -> t.ModelVersion:
        return cast(t.ModelVersion, self._get(f"/api/v1/registry/versions/{int(id)}/"))

    def approve_version(self, id: int, *, reason: str) -> t.ModelVersion:
        """Draft → approved (admins and compliance officers; a key with registry:review)."""
        return cast(
            t.ModelVersion,
            self._post(f"/api/v1/registry/versions/{int(id)}/approve", {"reason": reason}),
        )

    def deprecate_version(self, id: int, *, reason: str) -> t.ModelVersion:
        return cast(
            t.ModelVersion,
            self._post(f"/api/v1/registry/versions/{int(id)}/deprecate", {"reason": reason}),
        )

    def lineage(self, id: int) -> dict[str, Any]:
        return self._get(f"/api/v1/registry/versions/{int(id)}/lineage")

    # --- datasets -------------------------------------------------------------------

    def datasets(self) -> list[t.Dataset]:
        return cast(list[t.Dataset], self._get("/api/v1/datasets/"))

    def dataset(self, name: str) -> t.Dataset:
        """A dataset and all its versions."""
        return cast(t.Dataset, self._get(f"/api/v1/datasets/{_segment(name)}/"))

    def create_dataset(
        self, name: str, *, licence: str, source: str = "", description: str = ""
    ) -> t.Dataset:
        body = {"name": name, "licence": licence, "source": source, "description": description}
        return cast(t.Dataset, self._post("/api/v1/datasets/", body))

    def upload_dataset_version(
        self,
        dataset: str,
        file: str | Path,
        *,
        shape: str | None = None,
        column_mapping: dict[str, str] | None = None,
        tokenizer: int | None = None,
        max_tokens: int | None = None,
        wait: bool = False,
        timeout: float | None = None,
        progress: bool | None = None,
    ) -> t.DatasetVersion:
        """Upload a ``.jsonl``, ``.csv`` or ``.parquet`` file, streamed from disk. It is
        validated on the box; ``wait`` polls until it is (a rejected version raises
        JobFailed with the reason; its ``report`` says which rows are at fault)."""
        import json

        fields = _drop_none(
            {
                "shape": shape,
                "column_mapping": json.dumps(column_mapping) if column_mapping else None,
                "tokenizer": tokenizer,
                "max_tokens": max_tokens,
            }
        )
        _, version = self._upload(
            f"/api/v1/datasets/{_segment(dataset)}/versions/",
            file,
            {k: str(v) for k, v in fields.items()},
            progress,
        )
        if wait:
            version = self.wait_dataset_version(version["id"], timeout=timeout)
        return cast(t.DatasetVersion, version)

    def import_dataset_hf(
        self,
        dataset: str,
        *,
        repo_id: str,
        filename: str,
        revision: str = "",
        shape: str | None = None,
        column_mapping: dict[str, str] | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.HubImport:
        body = _drop_none(
            {
                "repo_id": repo_id,
                "filename": filename,
                "revision": revision,
                "shape": shape,
                "column_mapping": column_mapping,
            }
        )
        job = self._post(f"/api/v1/datasets/{_segment(dataset)}/import-hf", body)
        if wait:
            job = self._wait_bytes(lambda: self.dataset_import(job["id"]), timeout)
        return cast(t.HubImport, job)

    def dataset_import(self, id: int) -> t.HubImport:
        return cast(t.HubImport, self._get(f"/api/v1/dataset-imports/{int(id)}/"))

    def dataset_version(self, id: int) -> t.DatasetVersion:
        """The version and its validation ``report``."""
        return cast(t.DatasetVersion, self._get(f"/api/v1/dataset-versions/{int(id)}/"))

    def wait_dataset_version(
        self, id: int, *, timeout: float | None = None, raise_on_reject: bool = True
    ) -> t.DatasetVersion:
        """Poll until validation ends: ``valid`` or ``rejected``."""
        version = self._wait(
            lambda: self.dataset_version(id),
            done=lambda v: v["state"] != "validating",
            what=f"dataset version {id}'s validation",
            timeout=timeout,
        )
        if raise_on_reject:
            self._check_finished(version, f"Dataset version {id} was")
        return cast(t.DatasetVersion, version)

    def dataset_rows(self, id: int, *, start: int = 0, count: int = 20) -> t.DatasetRows:
        """Rows as read from the file (up to 100), invalid ones with their error."""
        return cast(
            t.DatasetRows,
            self._get(f"/api/v1/dataset-versions/{int(id)}/rows", start=start, count=count),
        )

    def derive_dataset_version(
        self,
        id: int,
        operation: str,
        params: dict[str, Any] | None = None,
        *,
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.DatasetTransform:
        """``split`` (``validation_fraction``, ``seed``), ``dedupe`` or ``filter``
        (``drop_pii``): a job making new versions; ``wait`` polls until it ends."""
        body = {"operation": operation, "params": params or {}}
        job = self._post(f"/api/v1/dataset-versions/{int(id)}/derive", body)
        if wait:
            job = self._wait(
                lambda: self.dataset_transform(job["id"]),
                done=lambda j: j["state"] in FINISHED,
                what=f"the {operation}",
                timeout=timeout,
            )
            self._check_finished(job, f"The {operation}")
        return cast(t.DatasetTransform, job)

    def dataset_transform(self, id: int) -> t.DatasetTransform:
        return cast(t.DatasetTransform, self._get(f"/api/v1/dataset-transforms/{int(id)}/"))

    # --- fine-tunes ----------------------------------------------------------------

    def finetunes(self) -> list[t.FineTune]:
        return cast(list[t.FineTune], self._get("/api/v1/finetunes/"))

    def finetune(self, id: int) -> t.FineTune:
        return cast(t.FineTune, self._get(f"/api/v1/finetunes/{int(id)}/"))

    def create_finetune(
        self,
        *,
        base_model: int,
        dataset_version: int,
        params: dict[str, Any] | None = None,
        validation_version: int | None = None,
        name: str = "",
        output_repo: str = "",
        chat_template: str = "",
    ) -> t.FineTune:
        """Queue a LoRA fine-tune; ``params`` as docs/api.md lists (the rest default)."""
        body = {
            "base_model": base_model,
            "dataset_version": dataset_version,
            "params": params or {},
            "name": name,
            "output_repo": output_repo,
            "chat_template": chat_template,
        }
        if validation_version is not None:
            body["validation_version"] = validation_version
        return cast(t.FineTune, self._post("/api/v1/finetunes/", body))

    def follow(
        self,
        id: int,
        *,
        timeout: float | None = None,
        progress: bool | None = None,
        raise_on_failure: bool = True,
    ) -> t.FineTune:
        """Poll a fine-tune until it ends, showing its steps and loss (a tqdm bar; in
        Jupyter with matplotlib, a live loss chart). Returns the finished job; one that
        failed or was cancelled raises JobFailed with the box's reason."""
        show = self._show() if progress is None else progress
        bar = JobProgress(label=f"Fine-tune {id}", total=None, unit="step", show=show)
        try:
            job = self._wait(
                lambda: self.finetune(id),
                done=lambda j: j["state"] in FINISHED,
                what=f"fine-tune {id}",
                timeout=timeout,
                update=bar.finetune,
            )
        finally:
            bar.close()
        if raise_on_failure:
            self._check_finished(job, f"Fine-tune {id}")
        return cast(t.FineTune, job)

    def cancel_finetune(self, id: int) -> t.FineTune:
        return cast(t.FineTune, self._post(f"/api/v1/finetunes/{int(id)}/cancel"))

    def retry_finetune(self, id: int) -> t.FineTune:
        return cast(t.FineTune, self._post(f"/api/v1/finetunes/{int(id)}/retry"))

    # --- quantisation, export, evaluation ----------------------------------------------

    def optimise_jobs(self) -> list[t.OptimiseJob]:
        return cast(list[t.OptimiseJob], self._get("/api/v1/optimise/jobs/"))

    def optimise_job(self, id: int) -> t.OptimiseJob:
        return cast(t.OptimiseJob, self._get(f"/api/v1/optimise/jobs/{int(id)}/"))

    def quantize(
        self,
        source: int,
        quant_type: str,
        *,
        allow_requantize: bool = False,
        imatrix_dataset: int | None = None,
        output_repo: str = "",
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.OptimiseJob:
        """Queue a quantisation of a model version (e.g. ``Q4_K_M``) into a new version."""
        body = _drop_none(
            {
                "operation": "quantize",
                "source": source,
                "quant_type": quant_type,
                "allow_requantize": allow_requantize,
                "imatrix_dataset": imatrix_dataset,
                "output_repo": output_repo or None,
            }
        )
        job = self._post("/api/v1/optimise/jobs/", body)
        return self._maybe_wait_percent(job, self.optimise_job, "The quantisation", wait, timeout)

    def export_model(
        self,
        source: int,
        *,
        adapter: int | None = None,
        out_type: str = "f16",
        output_repo: str = "",
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.OptimiseJob:
        """Queue an F16/BF16 export of a version, with ``adapter`` merged in if given."""
        body = _drop_none(
            {
                "operation": "export",
                "source": source,
                "adapter": adapter,
                "out_type": out_type,
                "output_repo": output_repo or None,
            }
        )
        job = self._post("/api/v1/optimise/jobs/", body)
        return self._maybe_wait_percent(job, self.optimise_job, "The export", wait, timeout)

    def evaluations(self, *, model_version: int | None = None) -> list[t.Evaluation]:
        return cast(
            list[t.Evaluation],
            self._get("/api/v1/optimise/evaluations/", model_version=model_version),
        )

    def evaluation(self, id: int) -> t.Evaluation:
        return cast(t.Evaluation, self._get(f"/api/v1/optimise/evaluations/{int(id)}/"))

    def evaluate(
        self,
        model_version: int,
        dataset_version: int,
        *,
        adapter: int | None = None,
        reference: int | None = None,
        n_ctx: int | None = None,
        max_chunks: int | None = None,
        max_items: int | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> t.Evaluation:
        """Queue an evaluation (perplexity; KL divergence against ``reference``; task
        scores on prompt/completion data)."""
        body = _drop_none(
            {
                "model_version": model_version,
                "dataset_version": dataset_version,
                "adapter": adapter,
                "reference": reference,
                "n_ctx": n_ctx,
                "max_chunks": max_chunks,
                "max_items": max_items,
            }
        )
        job = self._post("/api/v1/optimise/evaluations/", body)
        return self._maybe_wait_percent(job, self.evaluation, "The evaluation", wait, timeout)

    def _maybe_wait_percent(
        self, job: Any, fetch: Callable[[int], Any], what: str, wait: bool, timeout: float | None
    ) -> Any:
        if not wait:
            return job
        bar = JobProgress(
            label=f"{what[4:].capitalize()} {job['id']}", total=100, unit="%", show=self._show()
        )
        try:
            job = self._wait(
                lambda: fetch(job["id"]),
                done=lambda j: j["state"] in FINISHED,
                what=what.lower(),
                timeout=timeout,
                update=bar.percent,
            )
        finally:
            bar.close()
        return self._check_finished(job, what)

    # --- deployments and setups --------------------------------------------------------

    def deployments(self) -> list[t.Deployment]:
        return cast(list[t.Deployment], self._get("/api/v1/deployments/"))

    def deployment(self, name: str) -> t.Deployment:
        return cast(t.Deployment, self._get(f"/api/v1/deployments/{_segment(name)}/"))

    def create_deployment(
        self,
        name: str,
        *,
        model_version: int,
        adapter: int | None = None,
        wait: bool = False,
        timeout: float | None = None,
        **settings: Any,
    ) -> t.Deployment:
        """Deploy a model version (with ``adapter``, a LoRA adapter version, on top) under
        ``name``; ``settings`` as docs/api.md lists (``context_length``, ``replicas``...).
        ``wait`` polls until it is ready (a failed one raises JobFailed with why)."""
        body = _drop_none({"name": name, "model_version": model_version, "adapter": adapter})
        deployment = self._post("/api/v1/deployments/", body | settings)
        if wait:
            deployment = self.wait_deployment(name, timeout=timeout)
        return cast(t.Deployment, deployment)

    def wait_deployment(
        self, name: str, *, state: str = "ready", timeout: float | None = None
    ) -> t.Deployment:
        def reached(d: dict[str, Any]) -> bool:
            if d["state"] == "failed" and state != "failed":
                raise JobFailed(
                    f"Deployment {name} failed: {d.get('state_reason') or 'no reason given'}",
                    job=d,
                )
            return d["state"] == state

        return cast(
            t.Deployment,
            self._wait(
                lambda: self.deployment(name),
                done=reached,
                what=f"deployment {name} becoming {state}",
                timeout=timeout,
            ),
        )

    def _deployment_action(self, name: str, action: str, body: dict[str, Any] | None = None):
        return self._post(f"/api/v1/deployments/{_segment(name)}/{action}", body)

    def start_deployment(self, name: str) -> t.Deployment:
        return cast(t.Deployment, self._deployment_action(name, "start"))

    def stop_deployment(self, name: str) -> t.Deployment:
        return cast(t.Deployment, self._deployment_action(name, "stop"))

    def restart_deployment(self, name: str) -> t.Deployment:
        return cast(t.Deployment, self._deployment_action(name, "restart"))

    def scale_deployment(self, name: str, replicas: int) -> t.Deployment:
        return cast(t.Deployment, self._deployment_action(name, "scale", {"replicas": replicas}))

    def switch_deployment(
        self,
        name: str,
        *,
        model_version: int | None = None,
        settings: dict[str, Any] | None = None,
        label: str = "",
        stop_then_start: bool = False,
    ) -> t.Revision:
        """A new revision under the same name (loaded beside the serving one, then it
        takes the traffic); ``settings`` holds only what changes (``adapter`` too)."""
        body = _drop_none(
            {
                "model_version": model_version,
                "settings": settings or {},
                "label": label,
                "stop_then_start": stop_then_start,
            }
        )
        return cast(t.Revision, self._deployment_action(name, "switch", body))

    def rollback_deployment(self, name: str, revision: int) -> t.Revision:
        return cast(t.Revision, self._deployment_action(name, "rollback", {"revision": revision}))

    def workers(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/workers/")

    def setups(self) -> list[t.Setup]:
        return cast(list[t.Setup], self._get("/api/v1/setups/"))

    def setup(self, name: str) -> t.Setup:
        return cast(t.Setup, self._get(f"/api/v1/setups/{_segment(name)}/"))

    def switch_setup(self, setup: str, *, deployment: str, stop_then_start: bool = False):
        """Switch ``deployment`` to run ``setup`` (a new revision)."""
        body = {"deployment": deployment, "stop_then_start": stop_then_start}
        return cast(t.Revision, self._post(f"/api/v1/setups/{_segment(setup)}/switch", body))

    # --- usage ------------------------------------------------------------------------

    def usage(self, *, limit: int | None = 100, **filters: Any) -> list[t.UsageRecord]:
        """Usage records, newest first (own; admins and compliance officers: everyone's)."""
        return cast(list[t.UsageRecord], list(self._pages("/api/v1/usage/", filters, limit)))

    def usage_daily(self, *, days: int | None = None, **filters: Any) -> t.UsageDaily:
        return cast(t.UsageDaily, self._get("/api/v1/usage/daily/", days=days, **filters))

    def usage_limits(self) -> dict[str, Any]:
        return self._get("/api/v1/usage/limits/")

    # --- audit ------------------------------------------------------------------------

    def audit_events(self, *, limit: int | None = 100, **filters: Any) -> list[dict[str, Any]]:
        """Audit events, newest first; filters as docs/api.md lists."""
        return list(self._pages("/api/v1/audit/events/", filters, limit))

    def audit_public_key(self) -> t.PublicKey:
        """The box's audit signing key (PEM) and its fingerprint."""
        return cast(t.PublicKey, self._get("/api/v1/audit/public-key"))

    def audit_export(
        self,
        out: str | Path | None = None,
        *,
        format: str = "jsonl",
        **filters: Any,
    ) -> bytes:
        """A signed export of the (filtered) audit log: ``csv``, ``jsonl`` or ``pdf``.
        Written to ``out`` when given; the file's bytes are returned either way."""
        body = {k: str(v) for k, v in _drop_none(filters).items()}
        response = self._send("POST", f"/api/v1/audit/export.{format}", json=body)
        data = response.content
        if out is not None:
            Path(out).write_bytes(data)
        return data

    def verify_audit_export(
        self, data: bytes | str | Path, public_key_pem: bytes | str | None = None
    ) -> Verification:
        """Check an export's signature, content hash and event chain. Without
        ``public_key_pem`` the box's key is fetched: compare its fingerprint with one you
        trust, since a box that rewrote its log would sign with its own key too."""
        if isinstance(data, str | Path):
            data = Path(data).read_bytes()
        pem = public_key_pem or self.audit_public_key()["pem"]
        return verify_export(data, pem)

    # --- inference ----------------------------------------------------------------------

    def openai(self, deployment: str | None = None, **kwargs: Any):
        """OpenAI's own client, pointed at this box's ``/v1`` with this key. With
        ``deployment``, checks first that it exists (NotFound otherwise); pass its name
        as ``model`` to the calls. Needs ``pip install 'aibox-client[openai]'``."""
        try:
            import openai
        except ImportError as exc:
            raise MissingExtra(
                "Inference uses OpenAI's client: pip install 'aibox-client[openai]'."
            ) from exc
        if deployment is not None:
            self.deployment(deployment)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, **kwargs)
