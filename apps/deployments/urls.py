from django.urls import path

from apps.deployments import views

app_name = "deployments"

urlpatterns = [
    path("", views.deployment_list, name="list"),
    path("workers/", views.worker_list, name="workers"),
    path("playground/", views.playground, name="playground"),
    path("<str:name>/", views.deployment_detail, name="detail"),
    path(
        "<str:name>/<str:action>",
        views.deployment_action,
        name="action",
    ),
]
