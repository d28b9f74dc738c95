from django.urls import path

from apps.accounts import sso, views

app_name = "accounts"

urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", views.logout_view, name="logout"),
    path("sso/login/", sso.SsoLoginView.as_view(), name="sso_login"),
    path("sso/callback/", sso.SsoCallbackView.as_view(), name="sso_callback"),
    path("account/password/", views.password_change, name="password_change"),
    path("account/api-keys/", views.api_key_list, name="api_keys"),
    path("account/api-keys/<int:pk>/revoke/", views.api_key_revoke, name="api_key_revoke"),
    path("users/", views.user_list, name="user_list"),
    path("users/new/", views.user_create, name="user_create"),
    path("users/<int:pk>/", views.user_edit, name="user_edit"),
    path("limits/", views.limit_list, name="limit_list"),
    path("limits/api-keys/<int:pk>/", views.limit_api_key, name="limit_api_key"),
    path("limits/users/<int:pk>/", views.limit_user, name="limit_user"),
    path("limits/roles/<str:role>/", views.limit_role, name="limit_role"),
]
