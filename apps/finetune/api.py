from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.datasets.models import DatasetVersion
from apps.finetune import selectors, services
from apps.finetune.models import LAUNCHER_ROLES, FineTuneJob
from apps.registry.models import ModelVersion

READERS = role_and_scope(*LAUNCHER_ROLES, Role.COMPLIANCE_OFFICER, scopes=(Scope.DATASETS,))
LAUNCHERS = role_and_scope(*LAUNCHER_ROLES, scopes=(Scope.DATASETS,))


class JobSerializer(serializers.ModelSerializer):
    created_by = serializers.CharField(source="created_by.username", default=None)
    queue_position = serializers.SerializerMethodField()

    class Meta:
        model = FineTuneJob
        fields = [
            "id",
            "name",
            "base_model",
            "dataset_version",
            "validation_version",
            "params",
            "chat_template",
            "output_repo",
            "state",
            "reason",
            "queue_position",
            "attempts",
            "worker",
            "step",
            "max_steps",
            "epoch",
            "train_loss",
            "validation_loss",
            "learning_rate",
            "tokens_per_s",
            "eta_s",
            "last_checkpoint_step",
            "history",
            "logs",
            "result",
            "adapter",
            "peft_adapter",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]

    def get_queue_position(self, job: FineTuneJob) -> int | None:
        return services.queue_position(job)


class LaunchSerializer(serializers.Serializer):
    base_model = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    dataset_version = serializers.PrimaryKeyRelatedField(queryset=DatasetVersion.objects.all())
    validation_version = serializers.PrimaryKeyRelatedField(
        queryset=DatasetVersion.objects.all(), required=False, allow_null=True
    )
    params = serializers.DictField(required=False, default=dict)
    chat_template = serializers.CharField(required=False, allow_blank=True, default="")
    output_repo = serializers.CharField(required=False, allow_blank=True, default="")
    name = serializers.CharField(required=False, allow_blank=True, default="")


class JobListView(APIView):
    def get_permissions(self):
        return [(LAUNCHERS if self.request.method == "POST" else READERS)()]

    @extend_schema(operation_id="finetunes_list", responses=JobSerializer(many=True))
    def get(self, request: Request) -> Response:
        jobs = selectors.finetune_job_list(user=request.user)[:200]
        return Response(JobSerializer(jobs, many=True).data)

    @extend_schema(request=LaunchSerializer, responses={201: JobSerializer})
    def post(self, request: Request) -> Response:
        serializer = LaunchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        job = services.finetune_job_create(actor=request.user, **serializer.validated_data)
        return Response(JobSerializer(job).data, status=status.HTTP_201_CREATED)


def _job(request: Request, pk: int) -> FineTuneJob:
    try:
        job = selectors.finetune_job_get(user=request.user, pk=pk)
    except FineTuneJob.DoesNotExist as exc:
        raise Http404("No such fine-tune.") from exc
    return job


class JobDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=JobSerializer)
    def get(self, request: Request, pk: int) -> Response:
        return Response(JobSerializer(_job(request, pk)).data)


class JobActionView(APIView):
    permission_classes = [LAUNCHERS]
    action = ""

    @extend_schema(request=None, responses=JobSerializer)
    def post(self, request: Request, pk: int) -> Response:
        job = _job(request, pk)
        service = {"cancel": services.finetune_job_cancel, "retry": services.finetune_job_retry}
        job = service[self.action](actor=request.user, job=job)
        return Response(JobSerializer(job).data)
