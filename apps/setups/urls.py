from django.urls import path

from apps.setups import views

app_name = "setups"

urlpatterns = [
    path("", views.setup_list, name="list"),
    path("advisor/", views.advisor, name="advisor"),
    path("recipes/", views.recipe_list, name="recipes"),
    path("recipes/<str:name>/use", views.recipe_use, name="recipe_use"),
    path("switch/<str:deployment>/", views.switch, name="switch"),
    path("fit/", views.fit_notes, name="fit"),
    path("<str:name>/", views.setup_detail, name="detail"),
    path("<str:name>/trial", views.trial_start, name="trial"),
    path("<str:name>/recipe", views.recipe_export, name="export"),
]
