from django.urls import include, path

from apps.accounts import api as accounts_api
from apps.audit import api as audit_api

api_v1 = [
    path("me", accounts_api.MeView.as_view(), name="me"),
    path("users/", accounts_api.UserListView.as_view(), name="users"),
    path("api-keys/", accounts_api.ApiKeyListView.as_view(), name="api_keys"),
    path(
        "api-keys/<int:pk>/revoke", accounts_api.ApiKeyRevokeView.as_view(), name="api_key_revoke"
    ),
    path("audit/events/", audit_api.AuditEventListView.as_view(), name="audit_events"),
]

urlpatterns = [
    path("", include("apps.core.urls")),
    path("", include("apps.accounts.urls")),
    path("audit/", include("apps.audit.urls")),
    path("api/v1/", include((api_v1, "api"))),
]

handler403 = "apps.core.errors.forbidden"
handler404 = "apps.core.errors.not_found"
handler500 = "apps.core.errors.server_error"
