from __future__ import annotations

import json
import tempfile

from django.core.exceptions import ValidationError
from django.http import FileResponse, Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Scope
from apps.accounts.permissions import NotFromAnotherSite, role_and_scope
from apps.datasets import hub_imports, selectors, services, transforms
from apps.datasets.models import (
    SEE_ALL_ROLES,
    WRITER_ROLES,
    Dataset,
    DatasetImport,
    DatasetTransform,
    DatasetVersion,
    Shape,
)
from apps.datasets.uploads import ingest_upload
from apps.registry.api import DISK_FULL, HubImportSerializer, ImportRequestSerializer
from apps.registry.models import ModelVersion
from apps.registry.uploads import (
    StreamedUploadMixin,
    received_file,
)

READERS = role_and_scope(*WRITER_ROLES, *SEE_ALL_ROLES, scopes=(Scope.DATASETS,))
WRITERS = role_and_scope(*WRITER_ROLES, scopes=(Scope.DATASETS,))
PAGE_MAX = 100
# The upload's form fields (``_upload_settings`` reads all but the file).
UPLOAD_REQUEST = {
    "multipart/form-data": {
        "type": "object",
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "shape": {"type": "string", "enum": Shape.values},
            "column_mapping": {
                "type": "string",
                "description": 'A JSON object, e.g. {"prompt": "question"}',
            },
            "tokenizer": {"type": "integer", "description": "A GGUF model version's id"},
            "max_tokens": {"type": "integer", "minimum": 1},
        },
        "required": ["file"],
    }
}


class DatasetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", default=None, read_only=True)

    class Meta:
        model = Dataset
        fields = ["name", "description", "owner", "licence", "source", "created_at"]
        read_only_fields = ["created_at"]


class DatasetVersionSerializer(serializers.ModelSerializer):
    dataset = serializers.CharField(source="dataset.name")
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    trainable = serializers.BooleanField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    tokenizer = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = DatasetVersion
        fields = [
            "id",
            "dataset",
            "number",
            "file_name",
            "sha256",
            "size",
            "format",
            "declared_shape",
            "column_mapping",
            "tokenizer",
            "max_tokens",
            "source_kind",
            "source",
            "parent",
            "transformation",
            "created_by",
            "created_at",
            "state",
            "state_reason",
            "trainable",
            "progress_bytes",
            "validated_at",
            "shape",
            "rows",
            "valid_rows",
            "error_count",
            "pii_rows",
            "duplicate_rows",
        ]


class DatasetTransformSerializer(serializers.ModelSerializer):
    source_version = serializers.PrimaryKeyRelatedField(read_only=True)
    outputs = serializers.PrimaryKeyRelatedField(many=True, read_only=True)

    class Meta:
        model = DatasetTransform
        fields = [
            "id",
            "source_version",
            "operation",
            "params",
            "state",
            "reason",
            "details",
            "outputs",
            "created_at",
            "started_at",
            "finished_at",
        ]


class DatasetImportSerializer(HubImportSerializer):
    dataset = serializers.CharField(source="dataset.name")
    tokenizer = serializers.PrimaryKeyRelatedField(read_only=True)
    api_view = "api:dataset_import"

    class Meta:
        model = DatasetImport
        fields = [
            "dataset",
            *HubImportSerializer.Meta.fields,
            "declared_shape",
            "column_mapping",
            "tokenizer",
            "max_tokens",
        ]


class DatasetImportRequestSerializer(ImportRequestSerializer):
    """The import request as the schema shows it: the upload's optional settings travel
    with it (``_upload_settings`` reads them; the view validates the rest)."""

    shape = serializers.ChoiceField(choices=Shape.choices, required=False)
    column_mapping = serializers.JSONField(
        required=False, help_text='An object, or one as a JSON string: {"prompt": "question"}'
    )
    tokenizer = serializers.IntegerField(required=False, help_text="A GGUF model version's id")
    max_tokens = serializers.IntegerField(required=False, min_value=1)


def _dataset(request: Request, name: str) -> Dataset:
    try:
        return selectors.dataset_get(user=request.user, name=name)
    except Dataset.DoesNotExist as exc:
        raise Http404("No such dataset.") from exc


def _version(request: Request, pk: int) -> DatasetVersion:
    try:
        return selectors.dataset_version_get(user=request.user, pk=pk)
    except DatasetVersion.DoesNotExist as exc:
        raise Http404("No such dataset version.") from exc


class DatasetListView(APIView):
    def get_permissions(self):
        return [(WRITERS if self.request.method == "POST" else READERS)()]

    @extend_schema(operation_id="datasets_list", responses=DatasetSerializer(many=True))
    def get(self, request: Request) -> Response:
        datasets = selectors.dataset_list(user=request.user)
        return Response(DatasetSerializer(datasets, many=True).data)

    @extend_schema(request=DatasetSerializer, responses={201: DatasetSerializer})
    def post(self, request: Request) -> Response:
        serializer = DatasetSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        dataset = services.dataset_create(actor=request.user, **serializer.validated_data)
        return Response(DatasetSerializer(dataset).data, status=status.HTTP_201_CREATED)


class DatasetDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=DatasetSerializer)
    def get(self, request: Request, name: str) -> Response:
        dataset = _dataset(request, name)
        body = DatasetSerializer(dataset).data
        versions = selectors.dataset_version_list(dataset=dataset)
        body["versions"] = DatasetVersionSerializer(versions, many=True).data
        return Response(body)


def _upload_settings(data) -> dict:
    """The optional form fields that travel with an upload."""
    mapping = data.get("column_mapping") or "{}"
    try:
        mapping = json.loads(mapping) if isinstance(mapping, str) else mapping
    except json.JSONDecodeError as exc:
        raise ValidationError(
            'column_mapping must be a JSON object, e.g. {"prompt": "q"}.'
        ) from exc
    tokenizer = None
    if data.get("tokenizer"):
        try:
            tokenizer = selectors.tokenizer_choices().get(pk=int(data["tokenizer"]))
        except (TypeError, ValueError, ModelVersion.DoesNotExist) as exc:
            raise ValidationError("tokenizer must be the id of a registered GGUF model.") from exc
    max_tokens = None
    if data.get("max_tokens"):
        try:
            max_tokens = int(data["max_tokens"])
        except (TypeError, ValueError) as exc:
            raise ValidationError("max_tokens must be a whole number.") from exc
    return {
        "declared_shape": data.get("shape") or "",
        "column_mapping": mapping,
        "tokenizer": tokenizer,
        "max_tokens": max_tokens,
    }


class VersionUploadView(StreamedUploadMixin, APIView):
    """POST multipart ``file`` (+ ``shape``, ``column_mapping`` JSON, ``tokenizer``,
    ``max_tokens``): streamed to disk, stored once, validated by a background job."""

    permission_classes = [WRITERS]

    @extend_schema(
        request=UPLOAD_REQUEST, responses={201: DatasetVersionSerializer, 507: DISK_FULL}
    )
    def post(self, request: Request, name: str) -> Response:
        dataset = _dataset(request, name)
        upload, message, code = received_file(request, self.upload_handler)
        if upload is None:
            message = message or "Send the data as a multipart field named 'file'."
            return Response({"detail": message}, status=code)
        version = ingest_upload(
            actor=request.user,
            dataset=dataset,
            upload=upload,
            via="api",
            **_upload_settings(request.data),
        )
        return Response(DatasetVersionSerializer(version).data, status=status.HTTP_201_CREATED)


class ImportHfView(APIView):
    """POST ``{"repo_id", "filename", "revision"?}`` and the upload's optional ``shape``,
    ``column_mapping``, ``tokenizer``, ``max_tokens``: queue an import from Hugging Face."""

    permission_classes = [WRITERS]

    @extend_schema(request=DatasetImportRequestSerializer, responses={202: DatasetImportSerializer})
    def post(self, request: Request, name: str) -> Response:
        dataset = _dataset(request, name)
        serializer = ImportRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        job = hub_imports.dataset_import_request(
            actor=request.user,
            dataset=dataset,
            **serializer.validated_data,
            **_upload_settings(request.data),
        )
        return Response(DatasetImportSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class ImportDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=DatasetImportSerializer)
    def get(self, request: Request, pk: int) -> Response:
        try:
            job = selectors.dataset_import_get(user=request.user, pk=pk)
        except DatasetImport.DoesNotExist as exc:
            raise Http404("No such import.") from exc
        return Response(DatasetImportSerializer(job).data)


class VersionDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=DatasetVersionSerializer)
    def get(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        body = DatasetVersionSerializer(version).data
        report = dict(version.report)
        report.pop("index", None)  # an internal seek table, not for readers
        body["report"] = report
        return Response(body)


class VersionRowsView(APIView):
    """GET ``?start=0&count=20``: rows as read from the file (canonical fields)."""

    permission_classes = [READERS]

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        try:
            start = max(0, int(request.query_params.get("start", 0)))
            count = min(PAGE_MAX, max(1, int(request.query_params.get("count", 20))))
        except ValueError:
            return Response({"detail": "start and count must be whole numbers."}, status=400)
        rows = selectors.dataset_version_rows(version=version, start=start, count=count)
        return Response(
            {
                "start": start,
                "count": len(rows),
                "total": version.rows,
                "rows": [
                    {
                        "number": r.number,
                        "line": r.line,
                        "row": r.row,
                        "shape": str(r.shape) if r.shape else None,
                        "error": r.error,
                        "raw": r.raw,
                    }
                    for r in rows
                ],
            }
        )


class VersionDeriveView(APIView):
    """POST ``{"operation": "split"|"dedupe"|"filter", "params": {...}}`` → 202."""

    permission_classes = [WRITERS]

    @extend_schema(request=OpenApiTypes.OBJECT, responses={202: DatasetTransformSerializer})
    def post(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        params = request.data.get("params") or {}
        if not isinstance(params, dict):
            return Response({"detail": "params must be an object."}, status=400)
        job = transforms.dataset_transform_request(
            actor=request.user,
            version=version,
            operation=str(request.data.get("operation", "")),
            params=params,
        )
        return Response(DatasetTransformSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class VersionExportView(APIView):
    permission_classes = [READERS, NotFromAnotherSite]

    @extend_schema(
        responses={
            (200, "text/csv"): OpenApiTypes.STR,
            400: OpenApiResponse(description="The version did not validate: nothing to export."),
        }
    )
    def get(self, request: Request, pk: int) -> FileResponse | Response:
        version = _version(request, pk)
        return export_response(request.user, version)


def export_response(user, version: DatasetVersion) -> FileResponse:
    """The version's valid rows as a CSV download (spooled to a temporary file).

    Raises PermissionDenied or ValidationError (a version that is not valid)."""
    out = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 (FileResponse closes it)
    try:
        services.dataset_version_export_csv(actor=user, version=version, out=out)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    name = f"{version.dataset.name}-v{version.number}.csv"
    return FileResponse(out, as_attachment=True, filename=name, content_type="text/csv")


class TransformDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=DatasetTransformSerializer)
    def get(self, request: Request, pk: int) -> Response:
        try:
            job = selectors.dataset_transform_get(user=request.user, pk=pk)
        except DatasetTransform.DoesNotExist as exc:
            raise Http404("No such dataset job.") from exc
        return Response(DatasetTransformSerializer(job).data)
