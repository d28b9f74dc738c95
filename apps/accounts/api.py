from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts import selectors, services
from apps.accounts.models import ApiKey, Role, Scope, User
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
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=Scope.choices))
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
