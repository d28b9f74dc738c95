from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.accounts import api as accounts_api
from apps.datasets import api as datasets_api
from apps.deployments import api as deployments_api
from apps.deployments import internal as deployments_internal
from apps.deployments import internal_optimise, internal_training
from apps.finetune import api as finetune_api
from apps.inference import api as inference_api
from apps.inference import views as inference_views
from apps.optimise import api as optimise_api
from apps.provenance import api as provenance_api
from apps.provenance import urls as provenance_urls
from apps.registry import api as registry_api
from apps.registry import urls as registry_urls
from apps.setups import api as setups_api

api_v1 = [
    path("me", accounts_api.MeView.as_view(), name="me"),
    path("users/", accounts_api.UserListView.as_view(), name="users"),
    path("api-keys/", accounts_api.ApiKeyListView.as_view(), name="api_keys"),
    path(
        "api-keys/<int:pk>/revoke", accounts_api.ApiKeyRevokeView.as_view(), name="api_key_revoke"
    ),
    path("limits/", accounts_api.LimitListView.as_view(), name="limits"),
    path(
        "api-keys/<int:pk>/limits", accounts_api.ApiKeyLimitsView.as_view(), name="api_key_limits"
    ),
    path("users/<int:pk>/limits", accounts_api.UserLimitsView.as_view(), name="user_limits"),
    path("roles/<str:role>/limits", accounts_api.RoleLimitsView.as_view(), name="role_limits"),
    path("audit/events/", provenance_api.AuditEventListView.as_view(), name="audit_events"),
    *[
        path(
            f"audit/export.{fmt}",
            provenance_api.AuditExportView.as_view(fmt=fmt),
            name=f"audit_export_{fmt}",
        )
        for fmt in ("csv", "jsonl", "pdf")
    ],
    path("audit/public-key", provenance_api.AuditPublicKeyView.as_view(), name="audit_public_key"),
    path("usage/", inference_api.UsageListView.as_view(), name="usage"),
    path("usage/daily/", inference_api.UsageDailyView.as_view(), name="usage_daily"),
    path("usage/limits/", inference_api.UsageLimitsView.as_view(), name="usage_limits"),
    path("registry/repos/", registry_api.RepoListView.as_view(), name="repos"),
    path("registry/repos/<str:name>/", registry_api.RepoDetailView.as_view(), name="repo"),
    path(
        "registry/repos/<str:name>/versions/",
        registry_api.VersionUploadView.as_view(),
        name="version_upload",
    ),
    path(
        "registry/repos/<str:name>/import-path",
        registry_api.VersionImportPathView.as_view(),
        name="version_import_path",
    ),
    path(
        "registry/repos/<str:name>/import-hf",
        registry_api.ImportHfView.as_view(),
        name="model_import_request",
    ),
    path(
        "registry/imports/<int:pk>/", registry_api.ImportDetailView.as_view(), name="model_import"
    ),
    path("datasets/", datasets_api.DatasetListView.as_view(), name="datasets"),
    path("datasets/<str:name>/", datasets_api.DatasetDetailView.as_view(), name="dataset"),
    path(
        "datasets/<str:name>/versions/",
        datasets_api.VersionUploadView.as_view(),
        name="dataset_version_upload",
    ),
    path(
        "datasets/<str:name>/import-hf",
        datasets_api.ImportHfView.as_view(),
        name="dataset_import_request",
    ),
    path(
        "dataset-imports/<int:pk>/", datasets_api.ImportDetailView.as_view(), name="dataset_import"
    ),
    path(
        "dataset-versions/<int:pk>/",
        datasets_api.VersionDetailView.as_view(),
        name="dataset_version",
    ),
    path(
        "dataset-versions/<int:pk>/rows",
        datasets_api.VersionRowsView.as_view(),
        name="dataset_version_rows",
    ),
    path(
        "dataset-versions/<int:pk>/derive",
        datasets_api.VersionDeriveView.as_view(),
        name="dataset_version_derive",
    ),
    path(
        "dataset-versions/<int:pk>/export.csv",
        datasets_api.VersionExportView.as_view(),
        name="dataset_version_export",
    ),
    path(
        "dataset-transforms/<int:pk>/",
        datasets_api.TransformDetailView.as_view(),
        name="dataset_transform",
    ),
    path("finetunes/", finetune_api.JobListView.as_view(), name="finetunes"),
    path("finetunes/<int:pk>/", finetune_api.JobDetailView.as_view(), name="finetune"),
    *[
        path(
            f"finetunes/<int:pk>/{action}",
            finetune_api.JobActionView.as_view(action=action),
            name=f"finetune_{action}",
        )
        for action in ("cancel", "retry")
    ],
    path("deployments/", deployments_api.DeploymentListView.as_view(), name="deployments"),
    path(
        "deployments/<str:name>/", deployments_api.DeploymentDetailView.as_view(), name="deployment"
    ),
    *[
        path(
            f"deployments/<str:name>/{action}",
            deployments_api.DeploymentActionView.as_view(action=action),
            name=f"deployment_{action}",
        )
        for action in ("start", "stop", "restart", "scale")
    ],
    path(
        "deployments/<str:name>/switch",
        deployments_api.DeploymentSwitchView.as_view(),
        name="deployment_switch",
    ),
    path(
        "deployments/<str:name>/rollback",
        deployments_api.DeploymentRollbackView.as_view(),
        name="deployment_rollback",
    ),
    path(
        "deployments/<str:name>/load-on-demand",
        deployments_api.DeploymentLoadOnDemandView.as_view(),
        name="deployment_load_on_demand",
    ),
    path("workers/", deployments_api.WorkerListView.as_view(), name="workers"),
    path(
        "workers/credentials/",
        deployments_api.WorkerCredentialListView.as_view(),
        name="worker_credentials",
    ),
    path(
        "workers/credentials/<int:pk>/revoke",
        deployments_api.WorkerCredentialRevokeView.as_view(),
        name="worker_credential_revoke",
    ),
    path("registry/versions/<int:pk>/", registry_api.VersionDetailView.as_view(), name="version"),
    path(
        "registry/versions/<int:pk>/approve",
        registry_api.VersionStateView.as_view(transition="approve"),
        name="version_approve",
    ),
    path(
        "registry/versions/<int:pk>/deprecate",
        registry_api.VersionStateView.as_view(transition="deprecate"),
        name="version_deprecate",
    ),
    path(
        "registry/versions/<int:pk>/lineage",
        provenance_api.LineageView.as_view(),
        name="version_lineage",
    ),
    path(
        "registry/versions/<int:pk>/bom.cdx.json",
        provenance_api.BomView.as_view(),
        name="version_bom",
    ),
    path(
        "registry/versions/<int:pk>/licence-overrides",
        registry_api.LicenceOverrideView.as_view(),
        name="version_licence_overrides",
    ),
    path("optimise/jobs/", optimise_api.ModelJobListView.as_view(), name="optimise_jobs"),
    path("optimise/jobs/<int:pk>/", optimise_api.ModelJobDetailView.as_view(), name="optimise_job"),
    path(
        "optimise/evaluations/",
        optimise_api.EvaluationListView.as_view(),
        name="evaluations",
    ),
    path(
        "optimise/evaluations/<int:pk>/",
        optimise_api.EvaluationDetailView.as_view(),
        name="evaluation",
    ),
    path(
        "optimise/compare/<str:name>/",
        optimise_api.ComparisonView.as_view(),
        name="optimise_compare",
    ),
    path("setups/", setups_api.SetupListView.as_view(), name="setups"),
    path("setups/advise", setups_api.AdviseView.as_view(), name="setup_advise"),
    path("setups/advise/apply", setups_api.AdviseApplyView.as_view(), name="setup_advise_apply"),
    path("setups/import", setups_api.RecipeImportView.as_view(), name="recipe_import"),
    path("setups/recipe-book", setups_api.RecipeBookView.as_view(), name="recipe_book"),
    path("setups/trials/", setups_api.TrialListView.as_view(), name="trials"),
    path("setups/trials/<int:pk>/", setups_api.TrialDetailView.as_view(), name="trial"),
    path("setups/<str:name>/", setups_api.SetupDetailView.as_view(), name="setup"),
    path("setups/<str:name>/deploy", setups_api.SetupDeployView.as_view(), name="setup_deploy"),
    path("setups/<str:name>/trials", setups_api.SetupTrialView.as_view(), name="setup_trial"),
    path("setups/<str:name>/switch", setups_api.SetupSwitchView.as_view(), name="setup_switch"),
    path("setups/<str:name>/recipe", setups_api.RecipeExportView.as_view(), name="setup_recipe"),
]

urlpatterns = [
    path("", include("apps.core.urls")),
    path("", include("apps.accounts.urls")),
    path("", include("apps.ops.urls")),
    # The audit log's pages, reports and dossiers are the provenance app's (its top layer);
    # so are a version's lineage and ML-BOM pages, under the registry's names.
    path("audit/", include((provenance_urls.audit_urlpatterns, "audit"))),
    path(
        "registry/",
        include(([*registry_urls.urlpatterns, *provenance_urls.registry_urlpatterns], "registry")),
    ),
    path("datasets/", include("apps.datasets.urls")),
    path("finetunes/", include("apps.finetune.urls")),
    # The playground's chat is the inference app's, on the deployments pages' path.
    path(
        "deployments/playground/chat",
        inference_views.playground_chat,
        name="playground_chat",
    ),
    path("deployments/", include("apps.deployments.urls")),
    path("optimise/", include("apps.optimise.urls")),
    path("setups/", include("apps.setups.urls")),
    path("usage/", include("apps.inference.page_urls")),
    path("api/v1/", include((api_v1, "api"))),
    # The OpenAPI schema of /api/v1/ and a browsable docs page (docs/api.md).
    path("api/schema/", SpectacularAPIView.as_view(), name="api_schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api_schema"), name="api_docs"),
    path("v1/", include(("apps.inference.urls", "openai"))),
    # Serving workers on other hosts pull model files here, with a worker credential.
    path(
        "internal/v1/artifacts/<str:sha256>",
        deployments_internal.artifact_pull,
        name="internal_artifact",
    ),
    # Training workers on other hosts run fine-tunes through these (no database access).
    path(
        "internal/v1/finetune/<int:job_id>",
        internal_training.finetune_status,
        name="internal_finetune_status",
    ),
    path(
        "internal/v1/finetune/<int:job_id>/claim",
        internal_training.finetune_claim,
        name="internal_finetune_claim",
    ),
    path(
        "internal/v1/finetune/<int:job_id>/attempts/<int:attempt>/files/<str:name>",
        internal_training.finetune_file,
        name="internal_finetune_file",
    ),
    path(
        "internal/v1/finetune/<int:job_id>/attempts/<int:attempt>/finish",
        internal_training.finetune_finish,
        name="internal_finetune_finish",
    ),
    # And quantise, export and evaluation jobs (no database access either).
    path(
        "internal/v1/optimise/<str:kind>/<int:job_id>/claim",
        internal_optimise.optimise_claim,
        name="internal_optimise_claim",
    ),
    path(
        "internal/v1/optimise/<str:kind>/<int:job_id>/progress",
        internal_optimise.optimise_progress,
        name="internal_optimise_progress",
    ),
    path(
        "internal/v1/optimise/jobs/<int:job_id>/files/<str:name>",
        internal_optimise.optimise_file,
        name="internal_optimise_file",
    ),
    path(
        "internal/v1/optimise/<str:kind>/<int:job_id>/finish",
        internal_optimise.optimise_finish,
        name="internal_optimise_finish",
    ),
]

handler403 = "apps.core.errors.forbidden"
handler404 = "apps.core.errors.not_found"
handler500 = "apps.core.errors.server_error"
