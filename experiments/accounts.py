"""Account pages beside Django's own login, logout and password change: sign-up (off with
EDGEOPT_ALLOW_SIGNUP=false) and the API tokens page, where a token is shown once, when made."""
from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from .models import ApiToken

TOKEN_PANEL = "accounts/partials/token_panel.html"


def account_links(request) -> dict:
    """Context processor: whether the login page and the header offer sign-up."""
    return {"allow_signup": settings.EDGEOPT_ALLOW_SIGNUP}


@require_http_methods(["GET", "POST"])
def signup(request):
    if not settings.EDGEOPT_ALLOW_SIGNUP:
        raise Http404("sign-up is switched off on this server")
    if request.user.is_authenticated:
        return redirect(settings.LOGIN_REDIRECT_URL)
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        # The account was just made with this password: no need to authenticate (and count) it again.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(settings.LOGIN_REDIRECT_URL)
    return render(request, "registration/signup.html", {"form": form}, status=400 if form.errors else 200)


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="what the token is for, e.g. the script or machine using it")


def _token_panel(request, form: TokenForm, new_token: str | None = None, status: int = 200):
    """The tokens page, or only its panel when htmx asks (the panel has a stable id)."""
    context = {"form": form, "new_token": new_token, "tokens": request.user.api_tokens.all()}
    template = TOKEN_PANEL if request.htmx else "accounts/tokens.html"
    return render(request, template, context, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def tokens(request):
    if request.method == "GET":
        return _token_panel(request, TokenForm())
    form = TokenForm(request.POST)
    if not form.is_valid():
        return _token_panel(request, form, status=200 if request.htmx else 400)  # htmx swaps only 2xx
    _, token = ApiToken.issue(request.user, form.cleaned_data["name"])
    # Rendered, never redirected to: this response is the only time the token is shown.
    return _token_panel(request, TokenForm(), new_token=token, status=201)


@login_required
@require_POST
def revoke_token(request, token_id: int):
    token = get_object_or_404(ApiToken, pk=token_id, user=request.user)
    token.delete()
    if request.htmx:
        return _token_panel(request, TokenForm())
    return redirect("api-tokens")
