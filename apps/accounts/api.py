from __future__ import annotations

from typing import Any

from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts import selectors, services
from apps.accounts.models import (
    LIMIT_FIELDS,
    LIMIT_MAX_BUDGET,
    LIMIT_MAX_INT,
    ApiKey,
    LimitPeriod,
    Role,
    Scope,
    UsageLimit,
    User,
)
from apps.accounts.permissions import role_and_scope


class UserSerializer(serializers.ModelSerializer):
    class Meta:
        model = User
        fields = ["id", "username", "first_name", "last_name", "email", "role", "is_active"]


class ApiKeySerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "owner",
            "scopes",
            "deployments",
            "created_at",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "status",
        ]


class ApiKeyCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=Scope.choices), allow_empty=False
    )
    deployments = serializers.ListField(
        child=serializers.CharField(max_length=100), required=False, default=list
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class MeView(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(responses=UserSerializer)
    def get(self, request: Request) -> Response:
        body = UserSerializer(request.user).data
        if isinstance(request.auth, ApiKey):
            body["api_key"] = {"prefix": request.auth.prefix, "scopes": request.auth.scopes}
        return Response(body)


class UserListView(APIView):
    permission_classes = [role_and_scope(Role.ADMIN, scopes=(Scope.ADMIN,))]

    @extend_schema(responses=UserSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(UserSerializer(selectors.user_list(), many=True).data)


# Keys are administration: a key lists, mints or revokes keys only with the admin scope,
# so a leaked inference key can neither widen its own access nor revoke others.
KEY_MANAGERS = role_and_scope(*Role, scopes=(Scope.ADMIN,))


class ApiKeyListView(APIView):
    """Your own keys (GET) and a new one (POST: the secret is in this response only)."""

    permission_classes = [KEY_MANAGERS]

    @extend_schema(operation_id="api_keys_list", responses=ApiKeySerializer(many=True))
    def get(self, request: Request) -> Response:
        keys = selectors.api_key_list(user=request.user)
        return Response(ApiKeySerializer(keys, many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeySerializer})
    def post(self, request: Request) -> Response:
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        issued = services.api_key_create(
            actor=request.user, owner=request.user, **serializer.validated_data
        )
        body = ApiKeySerializer(issued.api_key).data | {"key": issued.secret}
        return Response(body, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


class ApiKeyRevokeView(APIView):
    permission_classes = [KEY_MANAGERS]

    @extend_schema(request=None, responses=ApiKeySerializer)
    def post(self, request: Request, pk: int) -> Response:
        api_key = get_object_or_404(ApiKey.objects.visible_to(request.user), pk=pk)
        services.api_key_revoke(actor=request.user, api_key=api_key)
        return Response(ApiKeySerializer(api_key).data)


# --- usage limits on the inference API (admins) -------------------------------

LIMIT_ADMINS = role_and_scope(Role.ADMIN, scopes=(Scope.ADMIN,))


class UsageLimitSerializer(serializers.ModelSerializer):
    subject = serializers.CharField(source="subject_kind", read_only=True)
    label = serializers.CharField(source="subject_label", read_only=True)

    class Meta:
        model = UsageLimit
        fields = ["id", "subject", "label", "api_key", "user", "role", *LIMIT_FIELDS, "updated_at"]


class LimitValuesSerializer(serializers.Serializer):
    """A PUT replaces every value: one left out or null is no limit at this level."""

    requests_per_minute = serializers.IntegerField(
        min_value=1, max_value=LIMIT_MAX_INT, required=False, allow_null=True, default=None
    )
    tokens_per_minute = serializers.IntegerField(
        min_value=1, max_value=LIMIT_MAX_INT, required=False, allow_null=True, default=None
    )
    max_concurrent = serializers.IntegerField(
        min_value=1, max_value=LIMIT_MAX_INT, required=False, allow_null=True, default=None
    )
    token_budget = serializers.IntegerField(
        min_value=1,
        max_value=LIMIT_MAX_BUDGET,
        required=False,
        allow_null=True,
        default=None,
    )
    budget_period = serializers.ChoiceField(
        choices=LimitPeriod.choices, required=False, allow_null=True, default=None
    )


class EffectiveLimitsSerializer(serializers.Serializer):
    requests_per_minute = serializers.IntegerField(allow_null=True)
    tokens_per_minute = serializers.IntegerField(allow_null=True)
    max_concurrent = serializers.IntegerField(allow_null=True)
    token_budget = serializers.IntegerField(allow_null=True)
    budget_period = serializers.CharField(allow_null=True)
    sources = serializers.DictField(
        child=serializers.CharField(), help_text="Where each set value comes from."
    )


class SubjectLimitsSerializer(LimitValuesSerializer):
    """The values set on this subject itself, and (keys, users) what applies in effect."""

    subject = serializers.CharField()
    label = serializers.CharField()
    updated_at = serializers.DateTimeField(allow_null=True)
    effective = EffectiveLimitsSerializer(allow_null=True)


class LimitListView(APIView):
    """Every limit set: roles' defaults, users' defaults and keys' own."""

    permission_classes = [LIMIT_ADMINS]

    @extend_schema(operation_id="limits_list", responses=UsageLimitSerializer(many=True))
    def get(self, request: Request) -> Response:
        return Response(UsageLimitSerializer(selectors.usage_limit_list(), many=True).data)


class SubjectLimitsView(APIView):
    """GET, PUT (replace) and DELETE the limits of one subject; each subclass says which."""

    permission_classes = [LIMIT_ADMINS]

    def subject(self, **kwargs: Any) -> dict[str, Any]:
        """The subject as ``limit_set``'s keyword arguments; 404 when it does not exist."""
        raise NotImplementedError

    def body(self, subject: dict[str, Any]) -> dict[str, Any]:
        limits = selectors.usage_limit_subject(**subject)
        effective = limits.effective
        return {
            "subject": limits.kind,
            "label": limits.label,
            **limits.values,
            "updated_at": limits.row.updated_at if limits.row is not None else None,
            "effective": effective.values | {"sources": effective.sources} if effective else None,
        }

    @extend_schema(responses=SubjectLimitsSerializer)
    def get(self, request: Request, **kwargs: Any) -> Response:
        subject = self.subject(**kwargs)
        return Response(SubjectLimitsSerializer(self.body(subject)).data)

    @extend_schema(request=LimitValuesSerializer, responses=SubjectLimitsSerializer)
    def put(self, request: Request, **kwargs: Any) -> Response:
        subject = self.subject(**kwargs)
        serializer = LimitValuesSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        services.limit_set(actor=request.user, **subject, **serializer.validated_data)
        return Response(SubjectLimitsSerializer(self.body(subject)).data)

    @extend_schema(request=None, responses=SubjectLimitsSerializer)
    def delete(self, request: Request, **kwargs: Any) -> Response:
        subject = self.subject(**kwargs)
        services.limit_clear(actor=request.user, **subject)
        return Response(SubjectLimitsSerializer(self.body(subject)).data)


class ApiKeyLimitsView(SubjectLimitsView):
    def subject(self, *, pk: int) -> dict[str, Any]:
        return {"api_key": get_object_or_404(ApiKey.objects.select_related("user"), pk=pk)}


class UserLimitsView(SubjectLimitsView):
    def subject(self, *, pk: int) -> dict[str, Any]:
        try:
            return {"user": selectors.user_get(pk=pk)}
        except User.DoesNotExist as exc:
            raise Http404("No such user.") from exc


class RoleLimitsView(SubjectLimitsView):
    def subject(self, *, role: str) -> dict[str, Any]:
        if role not in Role.values:
            raise Http404(f"No such role; the roles are {', '.join(Role.values)}.")
        return {"role": role}
