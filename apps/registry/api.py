from __future__ import annotations

from django.http import Http404
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.registry import model_imports, selectors, services
from apps.registry.licences import licence_not_allowed, version_licence
from apps.registry.models import (
    APPROVER_ROLES,
    WRITER_ROLES,
    HubImport,
    LicenceOverride,
    ModelImport,
    ModelRepo,
    ModelVersion,
)
from apps.registry.uploads import (
    StreamedUploadMixin,
    ingest_upload,
    received_file,
)

READERS = role_and_scope(*Role, scopes=(Scope.REGISTRY_READ,))
# How the schema describes a streamed multipart upload (the views read the body themselves).
UPLOAD_REQUEST = {
    "multipart/form-data": {
        "type": "object",
        "properties": {"file": {"type": "string", "format": "binary"}},
        "required": ["file"],
    }
}
# An upload that filled the disk (apps/registry/uploads.py): nothing was kept.
DISK_FULL = OpenApiResponse(description="The server's disk filled: nothing was kept.")


class ModelVersionSerializer(serializers.ModelSerializer):
    repo = serializers.CharField(source="repo.name")
    sha256 = serializers.CharField()
    size = serializers.IntegerField()
    created_by = serializers.CharField(source="created_by.username", default=None)
    state_changed_by = serializers.CharField(source="state_changed_by.username", default=None)
    parents = serializers.PrimaryKeyRelatedField(many=True, read_only=True)
    licence = serializers.SerializerMethodField(
        help_text="The SPDX expression the version is bound by: its repo's licence AND its "
        "parents' AND its training data's."
    )
    integrity_failed_at = serializers.DateTimeField(source="artifact.integrity_failed_at")
    last_verified_at = serializers.DateTimeField(source="artifact.last_verified_at")

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "repo",
            "number",
            "file_name",
            "sha256",
            "size",
            "format",
            "architecture",
            "parameter_count",
            "quantization",
            "context_length",
            "layers",
            "embedding_size",
            "vocab_size",
            "has_chat_template",
            "metadata",
            "source_kind",
            "source",
            "parents",
            "created_by",
            "created_at",
            "state",
            "state_changed_by",
            "state_changed_at",
            "state_reason",
            "licence",
            "last_verified_at",
            "integrity_failed_at",
        ]

    def get_licence(self, version: ModelVersion) -> str:
        return version_licence(version)


class ModelRepoSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", default=None, read_only=True)

    class Meta:
        model = ModelRepo
        fields = ["name", "description", "owner", "licence", "licence_url", "tags", "created_at"]
        read_only_fields = ["created_at"]


class HubImportSerializer(serializers.ModelSerializer):
    """What every Hugging Face import shows; subclasses add what it is for."""

    url = serializers.SerializerMethodField()
    page = serializers.SerializerMethodField()
    repo_id = serializers.CharField(source="hf_repo_id")
    created_by = serializers.CharField(source="created_by.username", default=None)
    api_view = ""  # the name of the API view that shows one import

    class Meta:
        fields = [
            "id",
            "url",
            "page",
            "repo_id",
            "filename",
            "revision",
            "endpoint",
            "state",
            "bytes_done",
            "bytes_total",
            "resolved",
            "reason",
            "notes",
            "version",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def get_url(self, job: HubImport) -> str:
        return reverse(self.api_view, args=[job.pk])

    def get_page(self, job: HubImport) -> str:
        return job.get_absolute_url()


class ModelImportSerializer(HubImportSerializer):
    repo = serializers.CharField(source="repo.name")
    api_view = "api:model_import"

    class Meta:
        model = ModelImport
        fields = ["repo", *HubImportSerializer.Meta.fields]


class ReasonSerializer(serializers.Serializer):
    reason = serializers.CharField(help_text="Why: recorded with the change and audited.")


class PathSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="A file under an AIBOX_IMPORT_DIRS directory.")


class ImportRequestSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=200)
    filename = serializers.CharField(max_length=1000)
    revision = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


def _repo(request: Request, name: str) -> ModelRepo:
    try:
        return selectors.model_repo_get(user=request.user, name=name)
    except ModelRepo.DoesNotExist as exc:
        raise Http404("No such model.") from exc


def _version(request: Request, pk: int) -> ModelVersion:
    try:
        return selectors.model_version_get(user=request.user, pk=pk)
    except ModelVersion.DoesNotExist as exc:
        raise Http404("No such model version.") from exc


class RepoListView(APIView):
    permission_classes = [READERS]

    @extend_schema(operation_id="registry_repos_list", responses=ModelRepoSerializer(many=True))
    def get(self, request: Request) -> Response:
        repos = selectors.model_repo_list(user=request.user)
        return Response(ModelRepoSerializer(repos, many=True).data)

    @extend_schema(request=ModelRepoSerializer, responses={201: ModelRepoSerializer})
    def post(self, request: Request) -> Response:
        serializer = ModelRepoSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        repo = services.model_repo_create(actor=request.user, **serializer.validated_data)
        return Response(ModelRepoSerializer(repo).data, status=status.HTTP_201_CREATED)

    def get_permissions(self):
        if self.request.method == "POST":
            return [role_and_scope(*WRITER_ROLES, scopes=(Scope.ADMIN,))()]
        return super().get_permissions()


class RepoDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=ModelRepoSerializer)
    def get(self, request: Request, name: str) -> Response:
        repo = _repo(request, name)
        body = ModelRepoSerializer(repo).data
        versions = selectors.model_version_list(repo=repo)
        body["versions"] = ModelVersionSerializer(versions, many=True).data
        return Response(body)


class VersionUploadView(StreamedUploadMixin, APIView):
    """POST multipart ``file``: streamed to disk, hashed, parsed, stored once."""

    permission_classes = [role_and_scope(*WRITER_ROLES, scopes=(Scope.ADMIN,))]

    @extend_schema(
        request=UPLOAD_REQUEST,
        responses={201: ModelVersionSerializer, 200: ModelVersionSerializer, 507: DISK_FULL},
    )
    def post(self, request: Request, name: str) -> Response:
        repo = _repo(request, name)
        upload, message, code = received_file(request, self.upload_handler)
        if upload is None:
            message = message or "Send the model as a multipart field named 'file'."
            return Response({"detail": message}, status=code)
        result = ingest_upload(actor=request.user, repo=repo, upload=upload, via="api")
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response(ModelVersionSerializer(result.version).data, status=code)


class VersionImportPathView(APIView):
    permission_classes = [role_and_scope(Role.ADMIN, scopes=(Scope.ADMIN,))]

    @extend_schema(
        request=PathSerializer, responses={201: ModelVersionSerializer, 200: ModelVersionSerializer}
    )
    def post(self, request: Request, name: str) -> Response:
        repo = _repo(request, name)
        path = request.data.get("path")
        if not isinstance(path, str) or not path:
            return Response({"detail": "Give the server-side 'path' to import."}, status=400)
        result = services.model_version_import_path(actor=request.user, repo=repo, path=path)
        code = status.HTTP_201_CREATED if result.created else status.HTTP_200_OK
        return Response(ModelVersionSerializer(result.version).data, status=code)


class VersionDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=ModelVersionSerializer)
    def get(self, request: Request, pk: int) -> Response:
        return Response(ModelVersionSerializer(_version(request, pk)).data)


class VersionStateView(APIView):
    """POST ``{"reason": …}`` to approve or deprecate."""

    permission_classes = [role_and_scope(*APPROVER_ROLES, scopes=(Scope.REGISTRY_REVIEW,))]
    transition = ""

    @extend_schema(request=ReasonSerializer, responses=ModelVersionSerializer)
    def post(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        service = {
            "approve": services.model_version_approve,
            "deprecate": services.model_version_deprecate,
        }[self.transition]
        service(actor=request.user, version=version, reason=str(request.data.get("reason", "")))
        return Response(ModelVersionSerializer(version).data)


class ImportHfView(APIView):
    """POST ``{"repo_id", "filename", "revision"?}``: queue an import from Hugging Face."""

    permission_classes = [role_and_scope(*WRITER_ROLES, scopes=(Scope.ADMIN,))]

    @extend_schema(request=ImportRequestSerializer, responses={202: ModelImportSerializer})
    def post(self, request: Request, name: str) -> Response:
        repo = _repo(request, name)
        serializer = ImportRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        job = model_imports.model_import_request(
            actor=request.user, repo=repo, **serializer.validated_data
        )
        return Response(ModelImportSerializer(job).data, status=status.HTTP_202_ACCEPTED)


class ImportDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=ModelImportSerializer)
    def get(self, request: Request, pk: int) -> Response:
        try:
            job = selectors.model_import_get(user=request.user, pk=pk)
        except ModelImport.DoesNotExist as exc:
            raise Http404("No such import.") from exc
        return Response(ModelImportSerializer(job).data)


class LicenceOverrideSerializer(serializers.ModelSerializer):
    version = serializers.PrimaryKeyRelatedField(read_only=True)
    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)

    class Meta:
        model = LicenceOverride
        fields = ["id", "version", "licence", "terms", "reason", "created_by", "created_at"]
        read_only_fields = ["licence", "terms", "created_at"]


class LicenceOverrideView(APIView):
    """GET the version's licence, the terms the allow-list lacks and the overrides
    recorded (admins and compliance officers); POST ``{"reason"}`` to record one
    (admins)."""

    permission_classes = [role_and_scope(*APPROVER_ROLES, scopes=(Scope.REGISTRY_READ,))]

    def get_permissions(self):
        if self.request.method == "POST":
            return [role_and_scope(Role.ADMIN, scopes=(Scope.ADMIN,))()]
        return super().get_permissions()

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        licence = version_licence(version)
        return Response(
            {
                "licence": licence,
                "not_allowed": licence_not_allowed(licence),
                "overrides": LicenceOverrideSerializer(
                    version.licence_overrides.select_related("created_by"), many=True
                ).data,
            }
        )

    @extend_schema(request=LicenceOverrideSerializer, responses={201: LicenceOverrideSerializer})
    def post(self, request: Request, pk: int) -> Response:
        version = _version(request, pk)
        serializer = LicenceOverrideSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        override = services.licence_override_create(
            actor=request.user, version=version, reason=serializer.validated_data["reason"]
        )
        return Response(LicenceOverrideSerializer(override).data, status=status.HTTP_201_CREATED)
