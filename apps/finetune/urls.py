from django.urls import path

from apps.finetune import views

app_name = "finetune"

urlpatterns = [
    path("", views.job_list, name="list"),
    path("estimate", views.job_estimate, name="estimate"),
    path("<int:pk>/", views.job_detail, name="job"),
    path("<int:pk>/<str:action>", views.job_action, name="action"),
]
