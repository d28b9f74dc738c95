from __future__ import annotations

from dataclasses import asdict

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.deployments import credentials, selectors, services
from apps.deployments.models import (
    MANAGER_ROLES,
    Deployment,
    WorkerCredential,
    labels_validator,
)
from apps.registry.models import ModelVersion

READERS = role_and_scope(*Role, scopes=(Scope.REGISTRY_READ, Scope.INFERENCE))
MANAGERS = role_and_scope(*MANAGER_ROLES, scopes=(Scope.ADMIN,))
ADMINS = role_and_scope(Role.ADMIN, scopes=(Scope.ADMIN,))


class ReplicaSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    worker = serializers.CharField()
    gpu_index = serializers.IntegerField(allow_null=True)
    generation = serializers.IntegerField()
    state = serializers.CharField()
    state_reason = serializers.CharField()
    memory_estimate_bytes = serializers.IntegerField()


class RevisionSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    state = serializers.CharField()
    label = serializers.CharField()
    reason = serializers.CharField()
    model_version = serializers.IntegerField(source="model_version_id")
    sha256 = serializers.CharField(source="model_version.sha256")
    adapter = serializers.IntegerField(source="adapter_id", allow_null=True)
    settings = serializers.JSONField(source="values")
    created_at = serializers.DateTimeField()
    activated_at = serializers.DateTimeField(allow_null=True)


def _labels_field(help_text: str) -> serializers.ListField:
    return serializers.ListField(
        child=serializers.CharField(),
        required=False,
        validators=[labels_validator],
        help_text=help_text,
    )


class DeploymentSerializer(serializers.ModelSerializer):
    model_version = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    placement_labels = _labels_field(
        "Run only on workers with all of these labels (AIBOX_WORKER_LABELS): "
        '["gpu=a100", "zone=b"]; a bare word matches any value. At most 16.'
    )
    exclude_labels = _labels_field('Never run on a worker with any of these: ["spot"]. At most 16.')
    model = serializers.CharField(source="model_version.repo.name", read_only=True)
    sha256 = serializers.CharField(source="model_version.sha256", read_only=True)
    replica_states = ReplicaSerializer(source="replica_set", many=True, read_only=True)
    revision = serializers.IntegerField(source="revision.number", read_only=True, default=None)
    revisions = RevisionSerializer(many=True, read_only=True)

    class Meta:
        model = Deployment
        fields = [
            "id",
            "name",
            "model_version",
            "model",
            "sha256",
            *services.SETTINGS_FIELDS,
            "running",
            "state",
            "state_reason",
            "idle_unloaded_at",
            "replica_states",
            "revision",
            "revisions",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "running",
            "state",
            "state_reason",
            "idle_unloaded_at",
            "created_at",
            "updated_at",
        ]
        # Uniqueness is the service's check, with its own message.
        extra_kwargs = {"name": {"validators": []}}


def _deployment(request: Request, name: str) -> Deployment:
    deployment = selectors.deployment_list(user=request.user).filter(name=name).first()
    if deployment is None:
        raise Http404("No such deployment.")
    return deployment


class DeploymentListView(APIView):
    def get_permissions(self):
        return [(MANAGERS if self.request.method == "POST" else READERS)()]

    @extend_schema(operation_id="deployments_list", responses=DeploymentSerializer(many=True))
    def get(self, request: Request) -> Response:
        deployments = selectors.deployment_list(user=request.user)
        return Response(DeploymentSerializer(deployments, many=True).data)

    @extend_schema(request=DeploymentSerializer, responses={201: DeploymentSerializer})
    def post(self, request: Request) -> Response:
        serializer = DeploymentSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        deployment = services.deployment_create(
            actor=request.user,
            name=data.pop("name"),
            model_version=data.pop("model_version"),
            **data,
        )
        return Response(DeploymentSerializer(deployment).data, status=status.HTTP_201_CREATED)


class DeploymentDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=DeploymentSerializer)
    def get(self, request: Request, name: str) -> Response:
        return Response(DeploymentSerializer(_deployment(request, name)).data)


class DeploymentActionView(APIView):
    """POST to start, stop or restart; scale takes ``{"replicas": n}``."""

    permission_classes = [MANAGERS]
    action = ""

    @extend_schema(request=OpenApiTypes.OBJECT, responses=DeploymentSerializer)
    def post(self, request: Request, name: str) -> Response:
        deployment = _deployment(request, name)
        if self.action == "scale":
            replicas = request.data.get("replicas")
            if not isinstance(replicas, int) or isinstance(replicas, bool):
                return Response({"detail": "Give 'replicas' as an integer."}, status=400)
            deployment = services.deployment_scale(
                actor=request.user, deployment=deployment, replicas=replicas
            )
        else:
            service = {
                "start": services.deployment_start,
                "stop": services.deployment_stop,
                "restart": services.deployment_restart,
            }[self.action]
            deployment = service(actor=request.user, deployment=deployment)
        deployment = _deployment(request, name)
        return Response(DeploymentSerializer(deployment).data)


class LoadOnDemandSerializer(serializers.Serializer):
    # Left out: unchanged. The ranges are the service's check, named by field.
    idle_unload_seconds = serializers.IntegerField(required=False, allow_null=True)
    load_timeout_seconds = serializers.IntegerField(required=False)


class DeploymentLoadOnDemandView(APIView):
    """Unload after ``idle_unload_seconds`` without requests (null: never) and load again
    for the next request, which waits up to ``load_timeout_seconds``."""

    permission_classes = [MANAGERS]

    @extend_schema(request=LoadOnDemandSerializer, responses=DeploymentSerializer)
    def post(self, request: Request, name: str) -> Response:
        deployment = _deployment(request, name)
        serializer = LoadOnDemandSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        services.deployment_load_on_demand_set(
            actor=request.user,
            deployment=deployment,
            idle_unload_seconds=data.get("idle_unload_seconds", deployment.idle_unload_seconds),
            load_timeout_seconds=data.get("load_timeout_seconds", deployment.load_timeout_seconds),
        )
        return Response(DeploymentSerializer(_deployment(request, name)).data)


class SwitchSerializer(serializers.Serializer):
    model_version = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.all(), required=False
    )
    settings = serializers.DictField(required=False, default=dict)
    label = serializers.CharField(required=False, default="", max_length=200)
    stop_then_start = serializers.BooleanField(required=False, default=False)


class DeploymentSwitchView(APIView):
    """Change a deployment's model or settings under the same name (a new revision that
    takes the traffic once loaded); ``settings`` holds only what changes."""

    permission_classes = [MANAGERS]

    @extend_schema(request=SwitchSerializer, responses={202: RevisionSerializer})
    def post(self, request: Request, name: str) -> Response:
        deployment = _deployment(request, name)
        serializer = SwitchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        values = dict(data["settings"])
        if "adapter" in values:
            adapter = values["adapter"]
            values["adapter"] = (
                ModelVersion.objects.filter(pk=adapter).first() if adapter is not None else None
            )
            if adapter is not None and values["adapter"] is None:
                return Response(
                    {"detail": "No such adapter.", "adapter": ["No such adapter."]}, status=400
                )
        revision = services.deployment_switch(
            actor=request.user,
            deployment=deployment,
            model_version=data.get("model_version") or deployment.model_version,
            label=data["label"],
            stop_then_start=data["stop_then_start"],
            **values,
        )
        return Response(RevisionSerializer(revision).data, status=status.HTTP_202_ACCEPTED)


class DeploymentRollbackView(APIView):
    """Switch back to what an earlier revision ran: ``{"revision": n}``."""

    permission_classes = [MANAGERS]

    @extend_schema(request=OpenApiTypes.OBJECT, responses={202: RevisionSerializer})
    def post(self, request: Request, name: str) -> Response:
        deployment = _deployment(request, name)
        number = request.data.get("revision")
        if not isinstance(number, int) or isinstance(number, bool):
            return Response(
                {"detail": "Give 'revision' as an integer.", "revision": ["An integer."]},
                status=400,
            )
        revision = services.deployment_rollback(
            actor=request.user, deployment=deployment, number=number
        )
        return Response(RevisionSerializer(revision).data, status=status.HTTP_202_ACCEPTED)


class WorkerSerializer(serializers.Serializer):
    """A worker as its last heartbeat describes it (``selectors.WorkerStatus``)."""

    hostname = serializers.CharField()
    online = serializers.BooleanField()
    last_seen = serializers.FloatField(help_text="Epoch seconds")
    seconds_since_seen = serializers.FloatField()
    serving = serializers.BooleanField()
    pool = serializers.CharField()
    cpu_cores = serializers.IntegerField()
    cpu_model = serializers.CharField()
    ram_total_mib = serializers.IntegerField()
    ram_available_mib = serializers.IntegerField()
    gpus = serializers.ListField(child=serializers.DictField())
    replicas = serializers.ListField(child=serializers.DictField())
    labels = serializers.ListField(
        child=serializers.CharField(), help_text="AIBOX_WORKER_LABELS: gpu=a100, spot, ..."
    )
    probe = serializers.DictField(child=serializers.FloatField())


class WorkerListView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=WorkerSerializer(many=True))
    def get(self, request: Request) -> Response:
        workers = [
            {**asdict(w), "seconds_since_seen": round(w.seconds_since_seen, 1)}
            for w in selectors.worker_list()
        ]
        return Response(WorkerSerializer(workers, many=True).data)


class WorkerCredentialSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", default=None, read_only=True)
    status = serializers.CharField(read_only=True)

    class Meta:
        model = WorkerCredential
        fields = ["id", "name", "status", "created_by", "created_at", "revoked_at", "last_used_at"]
        read_only_fields = fields


class WorkerCredentialIssueSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)


class IssuedWorkerCredentialSerializer(WorkerCredentialSerializer):
    secret = serializers.CharField(read_only=True, help_text="Shown once; never stored.")

    class Meta(WorkerCredentialSerializer.Meta):
        fields = [*WorkerCredentialSerializer.Meta.fields, "secret"]
        read_only_fields = fields


class WorkerCredentialListView(APIView):
    """Credentials of workers on other hosts (admins): list, and issue one (its secret
    is in the answer once)."""

    permission_classes = [ADMINS]

    @extend_schema(
        operation_id="worker_credentials_list", responses=WorkerCredentialSerializer(many=True)
    )
    def get(self, request: Request) -> Response:
        return Response(
            WorkerCredentialSerializer(selectors.worker_credential_list(), many=True).data
        )

    @extend_schema(
        request=WorkerCredentialIssueSerializer, responses={201: IssuedWorkerCredentialSerializer}
    )
    def post(self, request: Request) -> Response:
        serializer = WorkerCredentialIssueSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        issued = credentials.worker_credential_issue(
            actor=request.user, name=serializer.validated_data["name"]
        )
        data = {**WorkerCredentialSerializer(issued.credential).data, "secret": issued.secret}
        return Response(data, status=status.HTTP_201_CREATED)


class WorkerCredentialRevokeView(APIView):
    permission_classes = [ADMINS]

    @extend_schema(request=None, responses=WorkerCredentialSerializer)
    def post(self, request: Request, pk: int) -> Response:
        credential = selectors.worker_credential_list().filter(pk=pk).first()
        if credential is None:
            raise Http404("No such worker credential.")
        credential = credentials.worker_credential_revoke(actor=request.user, credential=credential)
        return Response(WorkerCredentialSerializer(credential).data)
