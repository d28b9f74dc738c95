"""Optimisation API: quantise, export/merge and evaluate under /api/v1/optimise/."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.datasets.models import DatasetVersion
from apps.optimise import selectors, services
from apps.optimise.models import LAUNCHER_ROLES, Evaluation, ModelJob, Operation
from apps.registry.models import ModelRepo, ModelVersion

READERS = role_and_scope(*Role, scopes=(Scope.REGISTRY_READ,))
# Like every registry write through a key: the job adds versions to the registry.
LAUNCHERS = role_and_scope(*LAUNCHER_ROLES, scopes=(Scope.ADMIN,))
# Like fine-tunes: an evaluation reads data and adds no version.
EVALUATORS = role_and_scope(*LAUNCHER_ROLES, scopes=(Scope.DATASETS,))


class ModelJobSerializer(serializers.ModelSerializer):
    source_label = serializers.CharField(source="source.__str__", read_only=True)
    output_sha256 = serializers.CharField(source="output_version.sha256", read_only=True)

    class Meta:
        model = ModelJob
        fields = [
            "id",
            "operation",
            "source",
            "source_label",
            "adapter",
            "finetune_job",
            "imatrix_dataset",
            "params",
            "output_repo",
            "output_version",
            "output_sha256",
            "state",
            "reason",
            "progress",
            "progress_message",
            "worker",
            "result",
            "created_at",
            "started_at",
            "finished_at",
        ]


class ModelJobRequestSerializer(serializers.Serializer):
    operation = serializers.ChoiceField(choices=Operation.choices)
    source = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    quant_type = serializers.CharField(required=False, help_text="quantize: e.g. Q4_K_M")
    allow_requantize = serializers.BooleanField(required=False, default=False)
    imatrix_dataset = serializers.PrimaryKeyRelatedField(
        queryset=DatasetVersion.objects.all(),
        required=False,
        allow_null=True,
        help_text="quantize: plain text to compute an importance matrix on",
    )
    imatrix_chunks = serializers.IntegerField(required=False, default=32)
    adapter = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    out_type = serializers.ChoiceField(choices=services.EXPORT_TYPES, required=False, default="f16")
    adapter_scale = serializers.FloatField(required=False, default=1.0)
    output_repo = serializers.CharField(required=False, allow_blank=True, default="")


class EvaluationSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model_version.__str__", read_only=True)
    dataset = serializers.CharField(source="dataset_version.__str__", read_only=True)

    class Meta:
        model = Evaluation
        fields = [
            "id",
            "model_version",
            "model",
            "adapter",
            "dataset_version",
            "dataset",
            "dataset_sha256",
            "reference",
            "params",
            "perplexity",
            "perplexity_uncertainty",
            "kl_divergence",
            "kl_uncertainty",
            "top_token_agreement",
            "exact_match",
            "contains",
            "tokens_per_s",
            "state",
            "reason",
            "progress",
            "progress_message",
            "worker",
            "result",
            "created_at",
            "started_at",
            "finished_at",
        ]


class EvaluationRequestSerializer(serializers.Serializer):
    model_version = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    dataset_version = serializers.PrimaryKeyRelatedField(queryset=DatasetVersion.objects.all())
    adapter = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    reference = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    n_ctx = serializers.IntegerField(required=False, default=512)
    max_chunks = serializers.IntegerField(required=False, default=100)
    max_items = serializers.IntegerField(required=False, default=200)


class ModelJobListView(APIView):
    def get_permissions(self):
        return [(LAUNCHERS if self.request.method == "POST" else READERS)()]

    @extend_schema(responses=ModelJobSerializer(many=True))
    def get(self, request: Request) -> Response:
        jobs = selectors.model_job_list(user=request.user)[:500]
        return Response(ModelJobSerializer(jobs, many=True).data)

    @extend_schema(request=ModelJobRequestSerializer, responses={201: ModelJobSerializer})
    def post(self, request: Request) -> Response:
        serializer = ModelJobRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data["operation"] == Operation.QUANTIZE:
            if not data.get("quant_type"):
                raise serializers.ValidationError({"quant_type": ["Name the quantisation type."]})
            job = services.quantize_request(
                actor=request.user,
                source=data["source"],
                quant_type=data["quant_type"],
                allow_requantize=data["allow_requantize"],
                output_repo=data["output_repo"],
                imatrix_dataset=data.get("imatrix_dataset"),
                imatrix_chunks=data["imatrix_chunks"],
            )
        else:
            job = services.export_request(
                actor=request.user,
                source=data["source"],
                adapter=data.get("adapter"),
                out_type=data["out_type"],
                adapter_scale=data["adapter_scale"],
                output_repo=data["output_repo"],
            )
        return Response(ModelJobSerializer(job).data, status=status.HTTP_201_CREATED)


class ModelJobDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=ModelJobSerializer)
    def get(self, request: Request, pk: int) -> Response:
        job = selectors.model_job_list(user=request.user).filter(pk=pk).first()
        if job is None:
            raise Http404("No such job.")
        return Response(ModelJobSerializer(job).data)


class EvaluationListView(APIView):
    def get_permissions(self):
        return [(EVALUATORS if self.request.method == "POST" else READERS)()]

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "model_version",
                {"type": "integer", "minimum": 0},
                description="A model version's id",
            )
        ],
        responses=EvaluationSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        evaluations = selectors.evaluation_list(user=request.user)
        version = request.query_params.get("model_version")
        if version:
            if not version.isdigit():
                raise serializers.ValidationError({"model_version": ["A version id."]})
            evaluations = evaluations.filter(model_version_id=int(version))
        return Response(EvaluationSerializer(evaluations[:500], many=True).data)

    @extend_schema(request=EvaluationRequestSerializer, responses={201: EvaluationSerializer})
    def post(self, request: Request) -> Response:
        serializer = EvaluationRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        evaluation = services.evaluation_request(actor=request.user, **serializer.validated_data)
        return Response(EvaluationSerializer(evaluation).data, status=status.HTTP_201_CREATED)


class EvaluationDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=EvaluationSerializer)
    def get(self, request: Request, pk: int) -> Response:
        evaluation = selectors.evaluation_list(user=request.user).filter(pk=pk).first()
        if evaluation is None:
            raise Http404("No such evaluation.")
        return Response(EvaluationSerializer(evaluation).data)


class ComparisonView(APIView):
    """A model's versions side by side: size, and the latest figures on each dataset."""

    permission_classes = [READERS]

    @extend_schema(responses=dict)
    def get(self, request: Request, name: str) -> Response:
        repo = ModelRepo.objects.filter(name=name).first()
        if repo is None:
            raise Http404("No such model.")
        comparison = selectors.comparison(user=request.user, repo=repo)
        rows = [
            {
                "version": row.version.pk,
                "label": str(row.version),
                "adapter": row.adapter.pk if row.adapter else None,
                "quantization": row.version.quantization,
                "size": row.size,
                "evaluations": {d: EvaluationSerializer(e).data for d, e in row.figures.items()},
            }
            for row in comparison.rows
        ]
        return Response({"repo": repo.name, "datasets": comparison.datasets, "rows": rows})
