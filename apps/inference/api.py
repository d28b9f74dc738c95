"""Usage API under /api/v1/usage/: the caller's own inference requests (everyone's for
admins and compliance officers), as records and per day, with the usage page's filters."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from aibox.redis_clients import sync_client
from apps.accounts.models import ApiKey, Role, Scope
from apps.accounts.permissions import role_and_scope
from apps.inference.limits import limits_of_keys
from apps.inference.models import UsageRecord
from apps.inference.pages import filter_form, limited_keys
from apps.inference.selectors import (
    DEFAULT_DAYS,
    MAX_DAYS,
    USAGE_COLUMNS,
    UsageFilters,
    usage_daily,
    usage_list,
    usage_period,
    usage_today,
    usage_totals,
)

# Every role reads its own usage. A key needs `inference` (an app's own key can watch its
# spending) or `audit:read` (the oversight scope, which compliance officers' keys hold).
READERS = role_and_scope(*Role, scopes=(Scope.INFERENCE, Scope.AUDIT_READ))

FILTER_PARAMETERS = [
    OpenApiParameter("key", str, description="An API key's prefix"),
    OpenApiParameter("user", str, description="A username (any case)"),
    OpenApiParameter("deployment", str, description="A deployment's name"),
    OpenApiParameter(
        "since", OpenApiTypes.DATE, description="First UTC day, included (1970-01-01 or later)"
    ),
    OpenApiParameter(
        "until", OpenApiTypes.DATE, description="Last UTC day, included (1970-01-01 or later)"
    ),
]


def _filters(request: Request) -> UsageFilters:
    form, filters = filter_form(request.query_params, user=request.user)
    if filters is None:
        raise ValidationError(form.errors)
    return filters


class UsageRecordSerializer(serializers.ModelSerializer):
    class Meta:
        model = UsageRecord
        fields = list(USAGE_COLUMNS)


class UsageCursorPagination(CursorPagination):
    # DRF positions the cursor on created_at; the id only makes the order total.
    ordering = ("-created_at", "-id")
    page_size = 50


class UsageListView(ListAPIView):
    """Inference requests, newest first, cursor-paginated; the usage page's filters as
    query parameters (an invalid one answers 400)."""

    permission_classes = [READERS]
    serializer_class = UsageRecordSerializer
    pagination_class = UsageCursorPagination

    @extend_schema(operation_id="usage_list", parameters=FILTER_PARAMETERS)
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        return usage_list(user=self.request.user, filters=_filters(self.request))


class DailyUsageSerializer(serializers.Serializer):
    day = serializers.DateField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="Requests whose outcome was not ok")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    tokens = serializers.IntegerField()


class DailyTotalsSerializer(DailyUsageSerializer):
    day = None


class UsageDailySerializer(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    totals = DailyTotalsSerializer(allow_null=True)
    days = DailyUsageSerializer(many=True)


class DaysSerializer(serializers.Serializer):
    days = serializers.IntegerField(min_value=1, max_value=MAX_DAYS, default=DEFAULT_DAYS)


class UsageDailyView(APIView):
    """Requests and tokens per UTC day, oldest first, days without requests included:
    the ``since``–``until`` range when given, else the last ``days`` days (30) to today."""

    permission_classes = [READERS]

    @extend_schema(
        parameters=[
            *FILTER_PARAMETERS,
            OpenApiParameter(
                "days",
                {"type": "integer", "minimum": 1, "maximum": MAX_DAYS, "default": DEFAULT_DAYS},
                description="Days up to today when 'since' is not given",
            ),
        ],
        responses=UsageDailySerializer,
    )
    def get(self, request: Request) -> Response:
        days = DaysSerializer(data=request.query_params)
        days.is_valid(raise_exception=True)
        filters = _filters(request)
        count = days.validated_data["days"]
        today = usage_today()
        start, end = usage_period(filters=filters, days=count, today=today)
        daily = usage_daily(user=request.user, filters=filters, days=count, today=today)
        body = {"start": start, "end": end, "totals": usage_totals(daily), "days": daily}
        return Response(UsageDailySerializer(body).data)


class KeyLimitsSerializer(serializers.Serializer):
    prefix = serializers.CharField()
    name = serializers.CharField()
    limits = serializers.DictField()


class UsageLimitsView(APIView):
    """The limits in effect on the caller's API keys and what is left of them (the key
    it is called with, when called with one). Admins and compliance officers may name
    any key with ``?key=<prefix>``."""

    permission_classes = [READERS]

    @extend_schema(
        parameters=[OpenApiParameter("key", str, description="An API key's prefix")],
        responses=KeyLimitsSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        prefix = request.query_params.get("key", "").strip()[:32]
        calling = request.auth if isinstance(request.auth, ApiKey) else None
        if calling is not None and not prefix:
            keys = [calling]
        else:
            keys = limited_keys(user=request.user, key_prefix=prefix)
        rows = [
            {"prefix": key.prefix, "name": key.name, "limits": status}
            for key, status in limits_of_keys(redis=sync_client(), keys=keys)
        ]
        return Response(KeyLimitsSerializer(rows, many=True).data)
