"""Setups API: setups, the advisor, trials and recipes under /api/v1/setups/."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import Http404, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.models import Role, Scope
from apps.accounts.permissions import NotFromAnotherSite, role_and_scope
from apps.deployments import selectors as deployment_selectors
from apps.deployments.api import DeploymentSerializer, RevisionSerializer
from apps.deployments.models import DEPLOYMENT_NAME
from apps.registry.models import ModelVersion
from apps.setups import recipes, selectors, services
from apps.setups.models import (
    SETUP_NAME_PATTERN,
    SETUP_SETTINGS,
    Experience,
    Setup,
    Trial,
    UseCase,
)

READERS = role_and_scope(*Role, scopes=(Scope.REGISTRY_READ,))
MANAGERS = role_and_scope(*services.MANAGER_ROLES, scopes=(Scope.ADMIN,))


class SetupSerializer(serializers.ModelSerializer):
    model_version = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    model = serializers.CharField(source="model_version.__str__", read_only=True)
    sha256 = serializers.CharField(source="model_version.sha256", read_only=True)

    class Meta:
        model = Setup
        fields = [
            "id",
            "name",
            "notes",
            "use_case",
            "experience",
            "model_version",
            "model",
            "sha256",
            *SETUP_SETTINGS,
            "origin",
            "recipe_signer",
            "recipe_signer_trusted",
            "created_at",
        ]
        read_only_fields = ["origin", "recipe_signer", "recipe_signer_trusted", "created_at"]
        # Uniqueness is the service's check, with its own message.
        extra_kwargs = {"name": {"validators": []}}


class TrialSerializer(serializers.ModelSerializer):
    setup = serializers.CharField(source="setup.name", read_only=True)

    class Meta:
        model = Trial
        fields = [
            "id",
            "setup",
            "worker",
            "state",
            "reason",
            "progress",
            "progress_message",
            *services.TRIAL_FIGURES,
            "details",
            "hardware",
            "hardware_class",
            "created_at",
            "started_at",
            "finished_at",
        ]


class AdviseSerializer(serializers.Serializer):
    use_case = serializers.ChoiceField(choices=UseCase.choices)
    experience = serializers.ChoiceField(choices=Experience.choices)
    worker = serializers.CharField(required=False, allow_blank=True, max_length=200)


class ApplySerializer(AdviseSerializer):
    model_version = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    action = serializers.ChoiceField(choices=["deploy", "trial"])
    name = serializers.CharField(required=False, max_length=100)
    deployment_name = serializers.CharField(
        required=False, max_length=100, validators=[DEPLOYMENT_NAME]
    )


class DeploySerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100, validators=[DEPLOYMENT_NAME])
    replicas = serializers.IntegerField(min_value=1, max_value=16, default=1)


class TrialRequestSerializer(serializers.Serializer):
    worker = serializers.CharField(required=False, allow_blank=True, max_length=200)


def _setup(request: Request, name: str) -> Setup:
    setup = selectors.setup_list(user=request.user).filter(name=name).first()
    if setup is None:
        raise Http404("No such setup.")
    return setup


class SetupListView(APIView):
    def get_permissions(self):
        return [(MANAGERS if self.request.method == "POST" else READERS)()]

    @extend_schema(operation_id="setups_list", responses=SetupSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(SetupSerializer(selectors.setup_list(user=request.user), many=True).data)

    @extend_schema(request=SetupSerializer, responses={201: SetupSerializer})
    def post(self, request: Request) -> Response:
        serializer = SetupSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        setup = services.setup_create(
            actor=request.user,
            name=data.pop("name"),
            use_case=data.pop("use_case"),
            experience=data.pop("experience"),
            model_version=data.pop("model_version"),
            notes=data.pop("notes", ""),
            **data,
        )
        return Response(SetupSerializer(setup).data, status=status.HTTP_201_CREATED)


class SetupDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(
        responses=OpenApiTypes.OBJECT,
        # /setups/trials/ is the trials list: reserved names are no setup's.
        parameters=[OpenApiParameter("name", str, "path", pattern=SETUP_NAME_PATTERN)],
    )
    def get(self, request: Request, name: str) -> Response:
        setup = _setup(request, name)
        trials = selectors.trial_list(user=request.user).filter(setup=setup)
        return Response(
            {**SetupSerializer(setup).data, "trials": TrialSerializer(trials, many=True).data}
        )


class AdviseView(APIView):
    """Ranked candidate setups for a use case and experience on the workers online now."""

    permission_classes = [READERS]

    @extend_schema(request=AdviseSerializer, responses=OpenApiTypes.OBJECT)
    def post(self, request: Request) -> Response:
        serializer = AdviseSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        advice = selectors.advice(**serializer.validated_data)
        return Response(
            {
                "use_case": advice.use_case,
                "experience": advice.experience,
                "workers": advice.worker_names,
                "candidates": [c.as_dict() for c in advice.candidates],
            }
        )


class AdviseApplyView(APIView):
    """Deploy the advisor's candidate for a model version, or run a trial of it, in one
    call: the setup is saved first (named after the candidate unless given a name)."""

    permission_classes = [MANAGERS]

    @extend_schema(request=ApplySerializer, responses={201: OpenApiTypes.OBJECT})
    def post(self, request: Request) -> Response:
        serializer = ApplySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        setup, outcome = services.candidate_apply(
            actor=request.user,
            use_case=data["use_case"],
            experience=data["experience"],
            model_version=data["model_version"],
            worker=data.get("worker") or None,
            action=data["action"],
            name=data.get("name") or None,
            deployment_name=data.get("deployment_name") or None,
        )
        body = {"setup": SetupSerializer(setup).data}
        if isinstance(outcome, Trial):
            body["trial"] = TrialSerializer(outcome).data
        else:
            body["deployment"] = DeploymentSerializer(outcome).data
        return Response(body, status=status.HTTP_201_CREATED)


class SetupDeployView(APIView):
    permission_classes = [MANAGERS]

    @extend_schema(request=DeploySerializer, responses={201: DeploymentSerializer})
    def post(self, request: Request, name: str) -> Response:
        setup = _setup(request, name)
        serializer = DeploySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        deployment = services.setup_deploy(
            actor=request.user, setup=setup, **serializer.validated_data
        )
        return Response(DeploymentSerializer(deployment).data, status=status.HTTP_201_CREATED)


class SwitchRequestSerializer(serializers.Serializer):
    deployment = serializers.CharField(max_length=100)
    stop_then_start = serializers.BooleanField(required=False, default=False)


class SetupSwitchView(APIView):
    """Switch a deployment to this setup under its name: ``{"deployment": name}``."""

    permission_classes = [MANAGERS]

    @extend_schema(request=SwitchRequestSerializer, responses={202: RevisionSerializer})
    def post(self, request: Request, name: str) -> Response:
        setup = _setup(request, name)
        serializer = SwitchRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        deployment = (
            deployment_selectors.deployment_list(user=request.user)
            .filter(name=serializer.validated_data["deployment"])
            .first()
        )
        if deployment is None:
            raise Http404("No such deployment.")
        revision = services.setup_switch(
            actor=request.user,
            setup=setup,
            deployment=deployment,
            stop_then_start=serializer.validated_data["stop_then_start"],
        )
        return Response(RevisionSerializer(revision).data, status=status.HTTP_202_ACCEPTED)


class SetupTrialView(APIView):
    permission_classes = [MANAGERS]

    @extend_schema(request=TrialRequestSerializer, responses={201: TrialSerializer})
    def post(self, request: Request, name: str) -> Response:
        setup = _setup(request, name)
        serializer = TrialRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        trial = services.trial_request(
            actor=request.user, setup=setup, worker=serializer.validated_data.get("worker") or None
        )
        return Response(TrialSerializer(trial).data, status=status.HTTP_201_CREATED)


class TrialListView(APIView):
    """Trials side by side: the comparison page's data."""

    permission_classes = [READERS]

    @extend_schema(
        parameters=[OpenApiParameter("setup", str, description="A setup's name")],
        responses=TrialSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        trials = selectors.trial_list(user=request.user)
        setup = request.query_params.get("setup")
        if setup:
            trials = trials.filter(setup__name=setup)
        return Response(TrialSerializer(trials[:500], many=True).data)


class TrialDetailView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses=TrialSerializer)
    def get(self, request: Request, pk: int) -> Response:
        trial = selectors.trial_list(user=request.user).filter(pk=pk).first()
        if trial is None:
            raise Http404("No such trial.")
        return Response(TrialSerializer(trial).data)


class RecipeExportView(APIView):
    """The setup as a signed recipe file, with the figures of its succeeded trials.
    Admins only: the box's key vouches for what it signs."""

    # Audited: a signed-in browser must not be made to fetch it from another site.
    permission_classes = [MANAGERS, NotFromAnotherSite]

    @extend_schema(responses={(200, "application/yaml"): OpenApiTypes.BINARY})
    def get(self, request: Request, name: str) -> HttpResponse:
        setup = _setup(request, name)
        data = services.setup_export(actor=request.user, setup=setup)
        response = HttpResponse(data, content_type="application/yaml; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{setup.name}.recipe.yaml"'
        return response


class RecipeImportView(APIView):
    """Import a recipe file (multipart ``file``): verify it, find its model by sha256,
    and save it as a setup. A model the box lacks answers 409 with where to get it."""

    permission_classes = [MANAGERS]
    parser_classes = [MultiPartParser]

    @extend_schema(
        request={
            "multipart/form-data": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "name": {
                        "type": "string",
                        "description": "The setup's name, if not the recipe's",
                    },
                },
                "required": ["file"],
            }
        },
        responses={
            201: OpenApiTypes.OBJECT,
            409: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="The recipe is sound but the box lacks its model: where to get it.",
            ),
        },
    )
    def post(self, request: Request) -> Response:
        upload = request.FILES.get("file")
        if upload is None:
            raise ValidationError({"file": "Attach the recipe file as 'file'."})
        if upload.size > recipes.MAX_RECIPE_BYTES:
            raise ValidationError(
                {"file": f"A recipe file is at most {recipes.MAX_RECIPE_BYTES // 1024} KiB."}
            )
        outcome = services.recipe_import(
            actor=request.user, data=upload.read(), name=request.data.get("name") or None
        )
        if outcome.setup is None:
            return Response(outcome.as_dict(), status=status.HTTP_409_CONFLICT)
        return Response(
            {**outcome.as_dict(), "setup": SetupSerializer(outcome.setup).data},
            status=status.HTTP_201_CREATED,
        )


class RecipeBookView(APIView):
    permission_classes = [READERS]

    @extend_schema(responses={200: {"type": "array", "items": {"type": "object"}}})
    def get(self, request: Request) -> Response:
        return Response([r.document for r in recipes.builtin_recipes()])
