"""How the OpenAPI schema (drf-spectacular) describes AIBox's API-key authentication.

drf-spectacular finds extensions by import; RegistryConfig.ready imports this module.
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "apps.accounts.authentication.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "aibox_<prefix>_<secret>",
            "description": "An AIBox API key; its scopes limit what it may call.",
        }


def only_api_v1(endpoints, **kwargs):
    """The views drf-spectacular describes: the REST API under /api/v1/ (not /metrics).
    The OpenAI-compatible /v1/ views are plain Django views, described by hand
    (apps/inference/openapi.py) and added by a postprocessing hook."""
    return [e for e in endpoints if e[0].startswith("/api/v1/")]
