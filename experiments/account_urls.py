"""/accounts/: Django's own login, logout and password change, plus sign-up and API tokens.
Not namespaced: Django's auth views and LOGIN_URL refer to these names as they are."""
from django.contrib.auth import views as auth_views
from django.urls import path

from . import accounts

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("password/", auth_views.PasswordChangeView.as_view(), name="password_change"),
    path("password/done/", auth_views.PasswordChangeDoneView.as_view(), name="password_change_done"),
    path("signup/", accounts.signup, name="signup"),
    path("tokens/", accounts.tokens, name="api-tokens"),
    path("tokens/<int:token_id>/revoke", accounts.revoke_token, name="api-token-revoke"),
]
