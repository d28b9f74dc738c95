"""AIBox settings: one module, driven by environment variables.

Every variable read here is listed in ``ENVIRONMENT_VARIABLES`` and documented in
docs/operator-guide.md (a test keeps the three in step). Local defaults are safe; a
production run (``AIBOX_DEBUG`` off) refuses to start without a real secret key.
"""

import ipaddress
from datetime import timedelta
from pathlib import Path

import environ
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from workers.labels import labels_parse

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# bin/aibox writes a .env with a generated secret key on first run; a real
# deployment passes variables from its environment instead (they take precedence).
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

ENVIRONMENT_VARIABLES = (
    "AIBOX_DEBUG",
    "AIBOX_SECRET_KEY",
    "AIBOX_ALLOWED_HOSTS",
    "AIBOX_CSRF_TRUSTED_ORIGINS",
    "AIBOX_SECURE_COOKIES",
    "AIBOX_TRUST_X_FORWARDED_FOR",
    "AIBOX_TRUSTED_PROXY_COUNT",
    "DATABASE_URL",
    "AIBOX_DATABASE_APP_ROLE",
    "AIBOX_DATABASE_APP_PASSWORD",
    "REDIS_URL",
    "AIBOX_ARTIFACT_ROOT",
    "AIBOX_API_KEY_HMAC_KEY",
    "AIBOX_USAGE_HASH_KEY",
    "AIBOX_AUDIT_SIGNING_KEY_FILE",
    "AIBOX_AUDIT_CHECKPOINT_FILE",
    "AIBOX_LOGIN_FAILURE_LIMIT",
    "AIBOX_OIDC_ISSUER",
    "AIBOX_OIDC_CLIENT_ID",
    "AIBOX_OIDC_CLIENT_SECRET",
    "AIBOX_OIDC_SCOPES",
    "AIBOX_OIDC_ROLE_CLAIM",
    "AIBOX_OIDC_ROLE_MAP",
    "AIBOX_LOCAL_LOGIN",
    "AIBOX_BREAK_GLASS_USERS",
    "AIBOX_LOGIN_COOLOFF_MINUTES",
    "AIBOX_LOG_LEVEL",
    "AIBOX_UPLOAD_MAX_BYTES",
    "AIBOX_REQUEST_MAX_BODY_BYTES",
    "AIBOX_INFERENCE_MAX_BODY_BYTES",
    "AIBOX_IMPORT_DIRS",
    "AIBOX_DEPLOY_LICENCE_ALLOWLIST",
    "AIBOX_ARTIFACT_REVERIFY_BATCH",
    "AIBOX_ARTIFACT_REVERIFY_EVERY",
    "AIBOX_MODEL_CACHE_DIR",
    "AIBOX_MODEL_CACHE_MAX_BYTES",
    "AIBOX_CONTROL_PLANE_URL",
    "AIBOX_WORKER_TOKEN",
    "AIBOX_WORKER_OFFLINE_AFTER",
    "AIBOX_WORKER_SERVING",
    "AIBOX_WORKER_LABELS",
    "AIBOX_USAGE_RETENTION_DAYS",
    "AIBOX_PROMPT_RETENTION_DAYS",
    "AIBOX_METRICS_ALLOWED_NETWORKS",
    "AIBOX_HF_ENDPOINT",
    "HF_ENDPOINT",
    "AIBOX_HF_TOKEN",
    "AIBOX_HF_CACHE_DIR",
    "AIBOX_FINETUNE_WORK_DIR",
    "AIBOX_FINETUNE_CACHE_DIR",
    "AIBOX_FINETUNE_DEVICE",
    "AIBOX_FINETUNE_HEARTBEAT_TTL",
    "AIBOX_RECIPE_TRUSTED_KEYS",
)

DEBUG = env.bool("AIBOX_DEBUG", default=False)

_INSECURE_KEY = "insecure-development-key-do-not-use-in-production"
SECRET_KEY = env.str("AIBOX_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "AIBOX_SECRET_KEY is not set. Set it to a long random string (for example "
            "`python -c 'import secrets; print(secrets.token_urlsafe(50))'`), "
            "or set AIBOX_DEBUG=true for a local development run."
        )
    SECRET_KEY = _INSECURE_KEY
elif not DEBUG and len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("AIBOX_SECRET_KEY must be at least 32 characters long.")

ALLOWED_HOSTS = env.list("AIBOX_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("AIBOX_CSRF_TRUSTED_ORIGINS", default=[])
SECURE_COOKIES = env.bool("AIBOX_SECURE_COOKIES", default=False)
SESSION_COOKIE_SECURE = SECURE_COOKIES
CSRF_COOKIE_SECURE = SECURE_COOKIES
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = 60 * 60 * 12
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Only behind a reverse proxy that sets it: otherwise clients could forge their IP.
TRUST_X_FORWARDED_FOR = env.bool("AIBOX_TRUST_X_FORWARDED_FOR", default=False)
# How many reverse proxies in front of AIBox append to X-Forwarded-For (counted from the
# right: entries further left come from the client and prove nothing).
TRUSTED_PROXY_COUNT = env.int("AIBOX_TRUSTED_PROXY_COUNT", default=1)
if TRUSTED_PROXY_COUNT < 1:
    raise ImproperlyConfigured("AIBOX_TRUSTED_PROXY_COUNT must be 1 or more.")
if TRUST_X_FORWARDED_FOR:
    # The same proxy tells us whether the client used HTTPS.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

DATABASES = {
    "default": env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/aibox"),
}
# A pool per process (web and workers), shared by all threads; Django checks a
# connection out for each request or task and returns it at the end.
DATABASES["default"]["CONN_MAX_AGE"] = 0
# The pool checks each connection before handing it out: one the server ended (a
# restart, a failover, pg_terminate_backend) is replaced instead of failing a request.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
    "min_size": 2,
    "max_size": 20,
    "timeout": 10,
}
if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    raise ImproperlyConfigured(
        "DATABASE_URL must point at PostgreSQL (postgres://...): the audit log relies on "
        "PostgreSQL triggers and advisory locks."
    )

# The role the running app connects as, which `manage.py db_app_role` (run as the tables'
# owner after migrate) creates and grants rows but not the schema; apps/core/database.py.
DATABASE_APP_ROLE = env.str("AIBOX_DATABASE_APP_ROLE", default="aibox_app")
DATABASE_APP_PASSWORD = env.str("AIBOX_DATABASE_APP_PASSWORD", default="")

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")

ARTIFACT_ROOT = Path(env.str("AIBOX_ARTIFACT_ROOT", default=str(BASE_DIR / "var" / "artifacts")))
# Largest model or dataset file accepted by upload or import.
UPLOAD_MAX_BYTES = env.int("AIBOX_UPLOAD_MAX_BYTES", default=50 * 1024**3)
# Largest request body on every other route (aibox/limits.py refuses more before reading),
# and on the inference API (/v1/ and the playground), whose prompts can be long.
REQUEST_MAX_BODY_BYTES = env.int("AIBOX_REQUEST_MAX_BODY_BYTES", default=1024**2)
INFERENCE_MAX_BODY_BYTES = env.int("AIBOX_INFERENCE_MAX_BODY_BYTES", default=2621440)
# Django's own check on request.body must not undercut the routes' limits above.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(REQUEST_MAX_BODY_BYTES, INFERENCE_MAX_BODY_BYTES)
# Server directories that admins may import files from (none by default).
IMPORT_DIRS = [Path(p) for p in env.list("AIBOX_IMPORT_DIRS", default=[])]
# Licences that may be deployed: every term of a version's licence (an SPDX expression
# that includes its parents' and its training data's) must be listed here, unless an
# admin records a licence override. The bundled Gemma is under "gemma".
DEPLOY_LICENCE_ALLOWLIST = env.list(
    "AIBOX_DEPLOY_LICENCE_ALLOWLIST",
    default=[
        "apache-2.0",
        "mit",
        "bsd-2-clause",
        "bsd-3-clause",
        "cc0-1.0",
        "cc-by-4.0",
        "gemma",
    ],
)
# Periodic full re-verification (Celery beat): each run re-hashes this many stored
# artifacts, those verified longest ago first, every this many seconds.
ARTIFACT_REVERIFY_BATCH = env.int("AIBOX_ARTIFACT_REVERIFY_BATCH", default=20)
ARTIFACT_REVERIFY_EVERY = env.float("AIBOX_ARTIFACT_REVERIFY_EVERY", default=3600.0)

# Each inference worker's local copy of the models it serves (verified by sha256).
MODEL_CACHE_DIR = Path(
    env.str("AIBOX_MODEL_CACHE_DIR", default=str(BASE_DIR / "var" / "model-cache"))
)
# The cache's size limit in bytes (0: none): least recently used files that no loaded
# replica holds are evicted to make room for a new one.
MODEL_CACHE_MAX_BYTES = env.int("AIBOX_MODEL_CACHE_MAX_BYTES", default=0)
if MODEL_CACHE_MAX_BYTES < 0:
    raise ImproperlyConfigured("AIBOX_MODEL_CACHE_MAX_BYTES must be 0 (no limit) or more.")
# A serving worker on another host pulls artifacts over HTTP from the control plane
# (/internal/v1/artifacts/<sha256>) with its worker credential; with neither set it opens
# them in the artifact store (a shared filesystem). The token is never logged.
CONTROL_PLANE_URL = env.str("AIBOX_CONTROL_PLANE_URL", default="").rstrip("/")
WORKER_TOKEN = env.str("AIBOX_WORKER_TOKEN", default="")
if CONTROL_PLANE_URL and not CONTROL_PLANE_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        "AIBOX_CONTROL_PLANE_URL must be an http:// or https:// address, "
        f"not {CONTROL_PLANE_URL!r}."
    )
if bool(CONTROL_PLANE_URL) != bool(WORKER_TOKEN):
    raise ImproperlyConfigured(
        "Set both AIBOX_CONTROL_PLANE_URL and AIBOX_WORKER_TOKEN (a worker on another host "
        "pulls artifacts with its credential), or neither."
    )
# A worker whose last heartbeat is older than this is offline; its replicas unavailable.
WORKER_SERVING = env.bool("AIBOX_WORKER_SERVING", default=True)
WORKER_OFFLINE_AFTER = env.float("AIBOX_WORKER_OFFLINE_AFTER", default=10.0)
# What this worker says about itself in its heartbeat (``gpu=a100,zone=b,spot``): a
# deployment's placement_labels and exclude_labels choose workers by them.
try:
    WORKER_LABELS = labels_parse(env.str("AIBOX_WORKER_LABELS", default=""))
except ValueError as exc:
    raise ImproperlyConfigured(f"AIBOX_WORKER_LABELS: {exc}") from exc

# Recipes (apps/setups): fingerprints of other boxes' Ed25519 keys whose recipes import
# without a warning (this box's own key is always trusted).
RECIPE_TRUSTED_KEYS = [
    k.strip().lower() for k in env.list("AIBOX_RECIPE_TRUSTED_KEYS", default=[]) if k.strip()
]
for _fingerprint in RECIPE_TRUSTED_KEYS:
    if len(_fingerprint) != 64 or any(c not in "0123456789abcdef" for c in _fingerprint):
        raise ImproperlyConfigured(
            f"AIBOX_RECIPE_TRUSTED_KEYS: '{_fingerprint}' is not a key fingerprint (64 hex "
            "digits, as the Setups page shows for this box's key)."
        )

# Hugging Face import: the hub or a mirror (huggingface_hub's own HF_ENDPOINT is honoured
# when AIBox's is unset), a token for gated and private repos (sent only to that endpoint,
# never stored or logged), and where downloads land before they are hashed into the store.
HF_ENDPOINT = (
    env.str("AIBOX_HF_ENDPOINT", default="")
    or env.str("HF_ENDPOINT", default="")
    or "https://huggingface.co"
).rstrip("/")
if not HF_ENDPOINT.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        f"AIBOX_HF_ENDPOINT must be an http:// or https:// address, not {HF_ENDPOINT!r}."
    )
HF_TOKEN = env.str("AIBOX_HF_TOKEN", default="")
# Fine-tunes: each job's checkpoints and outputs (on the training worker), and base models
# converted for transformers, cached by the GGUF's sha256 so a second job starts fast.
FINETUNE_WORK_DIR = Path(
    env.str("AIBOX_FINETUNE_WORK_DIR", default=str(BASE_DIR / "var" / "finetune"))
)
FINETUNE_CACHE_DIR = Path(
    env.str("AIBOX_FINETUNE_CACHE_DIR", default=str(BASE_DIR / "var" / "finetune-cache"))
)
FINETUNE_DEVICE = env.str("AIBOX_FINETUNE_DEVICE", default="auto")
# A running job's worker refreshes a liveness key with this time to live (seconds); when it
# expires the job is marked failed (the worker died) and a retry resumes from a checkpoint.
FINETUNE_HEARTBEAT_TTL = env.float("AIBOX_FINETUNE_HEARTBEAT_TTL", default=60.0)
HF_CACHE_DIR = Path(env.str("AIBOX_HF_CACHE_DIR", default=str(ARTIFACT_ROOT / "hf-downloads")))

# Retention (Celery beat, hourly): usage records older than this many days are deleted;
# prompts and outputs stored in full (a deployment's "full" logging level) are blanked
# sooner, after their own number of days. Audit events are never deleted.
USAGE_RETENTION_DAYS = env.int("AIBOX_USAGE_RETENTION_DAYS", default=90)
PROMPT_RETENTION_DAYS = env.int("AIBOX_PROMPT_RETENTION_DAYS", default=30)
if USAGE_RETENTION_DAYS < 1 or PROMPT_RETENTION_DAYS < 1:
    raise ImproperlyConfigured(
        "AIBOX_USAGE_RETENTION_DAYS and AIBOX_PROMPT_RETENTION_DAYS must be whole numbers "
        "of days, at least 1."
    )
# /metrics answers scrapers from these networks (CIDR, e.g. 10.0.0.0/8) without an API key.
try:
    METRICS_ALLOWED_NETWORKS = [
        ipaddress.ip_network(n, strict=False)
        for n in env.list("AIBOX_METRICS_ALLOWED_NETWORKS", default=[])
    ]
except ValueError as exc:
    raise ImproperlyConfigured(f"AIBOX_METRICS_ALLOWED_NETWORKS: {exc}") from exc

# Keyed hash for API keys. Derived from the secret key unless set; rotating either
# invalidates every issued API key (docs/operator-guide.md).
API_KEY_HMAC_KEY = env.str("AIBOX_API_KEY_HMAC_KEY", default="") or f"api-key:{SECRET_KEY}"
# Keys the digests that the "hashed" logging level keeps of prompts and outputs
# (apps/inference/services.usage_digest); derived from the secret key unless set.
USAGE_HASH_KEY = env.str("AIBOX_USAGE_HASH_KEY", default="") or f"usage-hash:{SECRET_KEY}"
# The Ed25519 private key that signs audit exports, reports and dossiers: generated on
# first use (mode 0600); back it up, and publish its public key (shown on /audit/).
AUDIT_SIGNING_KEY_FILE = Path(
    env.str("AIBOX_AUDIT_SIGNING_KEY_FILE", default=str(BASE_DIR / "var" / "audit-signing-key.pem"))
)

# Signed checkpoints of the audit chain's head (apps/audit/checkpoints.py): outside the
# database, so that events deleted from the end of the log are detected.
AUDIT_CHECKPOINT_FILE = Path(
    env.str(
        "AIBOX_AUDIT_CHECKPOINT_FILE", default=str(BASE_DIR / "var" / "audit-checkpoints.jsonl")
    )
)
AUDIT_CHECKPOINT_EVERY = 300.0

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "axes",
    "apps.core",
    "apps.accounts",
    "apps.audit",
    "apps.registry",
    "apps.datasets",
    "apps.finetune",
    "apps.deployments",
    "apps.optimise",
    "apps.inference",
    "apps.setups",
    "apps.ops",
    "apps.provenance",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "apps.audit.middleware.AuditContextMiddleware",
    # Last, so that it sees the outcome of authentication (django-axes requirement).
    "axes.middleware.AxesMiddleware",
]

# The OpenAI-compatible API (/v1/, bearer keys) runs with these only (aibox/asgi.py):
# security headers, the ALLOWED_HOSTS check, and the client address for audit events.
API_MIDDLEWARE = [
    "aibox.middleware.SecurityMiddleware",
    "aibox.middleware.CommonMiddleware",
    "apps.audit.middleware.AuditContextMiddleware",
]

ROOT_URLCONF = "aibox.urls"
ASGI_APPLICATION = "aibox.asgi.application"
WSGI_APPLICATION = "aibox.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "apps.core.context_processors.navigation",
            ],
        },
    },
]

AUTH_USER_MODEL = "accounts.User"
# Single sign-on with OpenID Connect (apps/accounts/sso.py): off unless an issuer is set.
OIDC_ISSUER = env.str("AIBOX_OIDC_ISSUER", default="").rstrip("/")
OIDC_RP_CLIENT_ID = env.str("AIBOX_OIDC_CLIENT_ID", default="")
OIDC_RP_CLIENT_SECRET = env.str("AIBOX_OIDC_CLIENT_SECRET", default="")
OIDC_RP_SCOPES = env.str("AIBOX_OIDC_SCOPES", default="openid email profile")
OIDC_RP_SIGN_ALGO = "RS256"
OIDC_AUTHENTICATION_CALLBACK_URL = "accounts:sso_callback"
OIDC_ROLE_CLAIM = env.str("AIBOX_OIDC_ROLE_CLAIM", default="groups")
# "group=role,group=role": the first entry whose group the claim holds gives the role.
OIDC_ROLE_MAP = [
    tuple(part.strip() for part in entry.split("=", 1))
    for entry in env.list("AIBOX_OIDC_ROLE_MAP", default=[])
]
LOCAL_LOGIN = env.str("AIBOX_LOCAL_LOGIN", default="on")
BREAK_GLASS_USERS = env.list("AIBOX_BREAK_GLASS_USERS", default=[])
_ROLES = ("admin", "data_scientist", "app_developer", "compliance_officer")
if OIDC_ISSUER and not (OIDC_RP_CLIENT_ID and OIDC_RP_CLIENT_SECRET):
    raise ImproperlyConfigured("AIBOX_OIDC_ISSUER needs AIBOX_OIDC_CLIENT_ID and _SECRET.")
if any(len(entry) != 2 or entry[1] not in _ROLES for entry in OIDC_ROLE_MAP):
    raise ImproperlyConfigured(
        f"AIBOX_OIDC_ROLE_MAP takes group=role entries, the roles being one of {_ROLES}."
    )
if LOCAL_LOGIN not in ("on", "break-glass"):
    raise ImproperlyConfigured("AIBOX_LOCAL_LOGIN is 'on' or 'break-glass'.")
if LOCAL_LOGIN == "break-glass" and not (OIDC_ISSUER and BREAK_GLASS_USERS):
    raise ImproperlyConfigured(
        "AIBOX_LOCAL_LOGIN=break-glass needs single sign-on (AIBOX_OIDC_ISSUER) and at least "
        "one AIBOX_BREAK_GLASS_USERS entry, or nobody could sign in."
    )

AUTHENTICATION_BACKENDS = [
    # django-axes first: it refuses locked-out accounts and IPs before the password check.
    "axes.backends.AxesStandaloneBackend",
    "apps.accounts.sso.LocalPasswordBackend",
    # Only with an issuer: the backend asks the provider's discovery document on first use.
    *(["apps.accounts.sso.SsoBackend"] if OIDC_ISSUER else []),
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 10},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "core:home"
# Where single sign-on lands when the provider or AIBox refused (the login page says so).
LOGIN_REDIRECT_URL_FAILURE = "/login/?sso=refused"
LOGOUT_REDIRECT_URL = "accounts:login"

# Failed logins: locked out per account and, separately, per client IP.
AXES_FAILURE_LIMIT = env.int("AIBOX_LOGIN_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AIBOX_LOGIN_COOLOFF_MINUTES", default=15))
# A username is locked at the address that failed with it (so no one can lock a known
# user out from elsewhere), and an address across usernames (so spraying is stopped).
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "accounts/locked_out.html"
AXES_HTTP_RESPONSE_CODE = 429
AXES_VERBOSE = False
AXES_CLIENT_IP_CALLABLE = "apps.audit.middleware.client_ip"

LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "aibox",
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.accounts.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "aibox.api.exception_handler",
    "DEFAULT_PARSER_CLASSES": [
        "aibox.api.JSONObjectParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.CursorPagination",
    "PAGE_SIZE": 50,
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
# The OpenAPI schema (/api/schema/) and its docs page (/api/docs/), for signed-in users
# and API keys; Swagger UI is served from the drf-spectacular-sidecar package, never a CDN.
SPECTACULAR_SETTINGS = {
    "TITLE": "AIBox API",
    "DESCRIPTION": "The AIBox control plane: registry, datasets, fine-tunes, deployments, "
    "audit, under /api/v1/; and the OpenAI-compatible inference endpoint under /v1/, whose "
    "errors take OpenAI's shape. See docs/api.md.",
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/api/v1",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["apps.registry.openapi.only_api_v1"],
    # Every REST operation's error responses (aibox/api.py), then the OpenAI-compatible
    # /v1/ endpoint, which is plain Django views (apps/inference/openapi.py).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "aibox.api.error_responses",
        "apps.inference.openapi.openai_paths",
    ],
    # Several models have a "state"; each choice set gets its own name.
    "ENUM_NAME_OVERRIDES": {
        "ModelVersionStateEnum": "apps.registry.models.State",
        "ImportStateEnum": "apps.registry.models.ImportState",
        "DatasetVersionStateEnum": "apps.datasets.models.State",
        "DatasetShapeEnum": "apps.datasets.models.Shape",
        "DeploymentStateEnum": "apps.deployments.models.State",
        "FineTuneJobStateEnum": "apps.finetune.models.JobState",
        "OptimiseOperationEnum": "apps.optimise.models.Operation",
        "AuditOutcomeEnum": "apps.audit.models.Outcome",
        "UsageOutcomeEnum": "apps.inference.models.Outcome",
    },
}

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# Longer than the longest job (a fine-tune may run 24 hours, apps/finetune/tasks.py), so
# Redis does not hand a running task to a second worker.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 25 * 60 * 60}
CELERY_TASK_SOFT_TIME_LIMIT = 60 * 60
CELERY_TASK_TIME_LIMIT = 60 * 60 + 60
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# A lost broker connection does not cancel running tasks (a fine-tune trains on through a
# Redis restart; tests/finetune/test_faults.py). Celery 6 would default to cancelling.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Each worker also consumes its own queue: loads, unloads and requests for the
# replicas it holds go there.
CELERY_WORKER_DIRECT = True
# Periodic tasks, sent by the one `celery -A aibox beat` process (bin/aibox run, the beat
# service in docker-compose.yml). A plain dict: each app adds its own entries.
CELERY_BEAT_SCHEDULE = {
    "usage-prune": {"task": "ops.usage_prune", "schedule": crontab(minute=17)},
    # Stored artifacts re-hashed a batch at a time (apps/registry/tasks.py).
    "artifact-reverify": {
        "task": "registry.artifact_reverify",
        "schedule": ARTIFACT_REVERIFY_EVERY,
    },
    # A signed checkpoint of the audit chain's head, outside the database (apps/audit).
    "audit-checkpoint": {"task": "audit.checkpoint", "schedule": AUDIT_CHECKPOINT_EVERY},
    # Staged files that a crashed upload or import left behind (apps/registry/tasks.py).
    "artifact-staging-prune": {
        "task": "registry.artifact_staging_prune",
        "schedule": crontab(minute=43),
    },
    # Fine-tunes whose training worker died are marked failed (apps/finetune/tasks.py).
    "finetune-reap": {"task": "finetune.reap", "schedule": 30.0},
    # Trials whose worker went away are marked failed (apps/setups/tasks.py).
    "trial-reap": {"task": "setups.trial_reap", "schedule": 300.0},
    # Quantise, export and evaluation jobs whose worker went silent (apps/optimise/tasks.py).
    "optimise-reap": {"task": "optimise.reap", "schedule": 60.0},
    # Deployments with load on demand unload after their idle period (apps/deployments).
    "deployment-idle-unload": {"task": "deployments.idle_unload", "schedule": 30.0},
    # Replicas on a worker that went offline are placed on others (apps/deployments).
    "replicas-rehome": {"task": "deployments.replicas_rehome", "schedule": 15.0},
}
# Beat's record of when each entry last ran: under var/, never in the repository.
CELERY_BEAT_SCHEDULE_FILENAME = str(BASE_DIR / "var" / "celerybeat-schedule")

LOG_LEVEL = env.str("AIBOX_LOG_LEVEL", default="INFO").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "filters": {"per_request_tasks": {"()": "aibox.logfilters.QuietPerRequestTasks"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "axes": {"level": "WARNING"},
        # Celery's "Task ... received" and "... succeeded" lines.
        "celery.worker.strategy": {"filters": ["per_request_tasks"]},
        "celery.app.trace": {"filters": ["per_request_tasks"]},
    },
}
