from django.urls import path

from apps.optimise import views

app_name = "optimise"

urlpatterns = [
    path("versions/<int:pk>/", views.version_panel, name="panel"),
    path("versions/<int:pk>/quantize", views.quantize, name="quantize"),
    path("versions/<int:pk>/export", views.export, name="export"),
    path("versions/<int:pk>/evaluate", views.evaluate, name="evaluate"),
    path("jobs/<int:pk>/", views.job_detail, name="job"),
    path("evaluations/<int:pk>/", views.evaluation_detail, name="evaluation"),
    path("compare/<str:name>/", views.compare, name="compare"),
]
