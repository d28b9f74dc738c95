from django.urls import path

from apps.inference import views

# Mounted at /v1/: the paths OpenAI clients expect.
urlpatterns = [
    path("models", views.models, name="models"),
    path("models/<str:name>", views.model_detail, name="model"),
    path("chat/completions", views.chat_completions, name="chat_completions"),
    path("completions", views.completions, name="completions"),
    path("embeddings", views.embeddings, name="embeddings"),
]
