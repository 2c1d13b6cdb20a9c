from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.shortcuts import get_object_or_404, redirect
from django.urls import path, reverse
from django.utils.html import format_html
from django.views.decorators.http import require_POST

from . import services
from .models import (ApiToken, Experiment, ExperimentProgress, InvalidTransition, ModelFile, OptimizationRun,
                     Recommendation)


class OptimizationRunInline(admin.TabularInline):
    model = OptimizationRun
    extra = 0
    can_delete = False
    fields = ("technique", "status", "accuracy", "accuracy_drop", "size_bytes", "compression_ratio",
              "latency_ms", "speedup", "error")
    readonly_fields = fields
    show_change_link = True


class ModelFileInline(admin.TabularInline):
    model = ModelFile
    extra = 0
    can_delete = False
    fields = ("role", "technique", "kind", "format", "path", "size_bytes")
    readonly_fields = fields


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ("id", "name", "owner", "framework", "target_device", "dataset", "goal", "status", "attempts",
                    "created_at", "finished_at", "results_link")
    list_filter = ("status", "framework", "target_device", "goal", "plan")
    search_fields = ("name", "dataset", "error", "owner__username")
    raw_id_fields = ("owner",)
    readonly_fields = ("status", "stop_requested", "attempts", "heartbeat_at", "worker_token", "error", "baseline",
                       "analysis", "created_at", "started_at", "finished_at")
    inlines = [OptimizationRunInline, ModelFileInline]
    actions = ["stop_experiments"]

    def has_change_permission(self, request, obj=None):
        # A finished run is a record, and a queued or running one is the worker's (a save from
        # the form would write back the status and heartbeat it was loaded with): view only.
        # Its page offers Stop instead (change_form.html).
        if obj is not None and (obj.is_finished or obj.is_active):
            return False
        return super().has_change_permission(request, obj)

    def get_urls(self):
        stop = self.admin_site.admin_view(require_POST(self.stop_view))
        return [path("<int:experiment_id>/stop/", stop, name="experiments_experiment_stop"), *super().get_urls()]

    def stop_view(self, request, experiment_id: int):
        """The Stop button of a queued or running experiment's page."""
        experiment = get_object_or_404(self.get_queryset(request), pk=experiment_id)
        if not self.has_change_permission(request):  # the model-wide right: this row is view only
            raise PermissionDenied
        try:
            outcome = experiment.request_stop()
        except InvalidTransition as exc:
            self.message_user(request, str(exc), messages.WARNING)
        else:
            self.message_user(request, f"{experiment}: {outcome}", messages.SUCCESS)
        return redirect("admin:experiments_experiment_change", experiment.pk)

    def get_queryset(self, request):
        """Through the one scoping rule; staff (the only users the admin lets in) see all.
        `viewer_owns` says whose results page the viewer may open."""
        visible = services.visible_experiments(request.user, staff_sees_all=True)
        return visible.annotate(viewer_owns=Q(owner_id=request.user.pk))

    @admin.display(description="results")
    def results_link(self, experiment):
        # The results page is the owner's alone (another user's answers 404, staff included).
        if not experiment.viewer_owns:
            return "—"
        return format_html('<a href="{}">results</a>', reverse("experiments:results", args=[experiment.pk]))

    def has_delete_permission(self, request, obj=None):
        # A queued or running experiment is the worker's: stop it first (the Stop action).
        if obj is not None and obj.is_active:
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request, obj):
        """The same delete as the API's: stored files go with the rows."""
        services.delete_experiment(obj)

    def delete_queryset(self, request, queryset):
        active = [e for e in queryset if e.is_active]
        if active:
            self.message_user(request, f"{len(active)} selected experiment(s) are queued or running and were "
                                       "kept; stop them first", messages.WARNING)
        for experiment in queryset:
            if not experiment.is_active:
                services.delete_experiment(experiment)

    @admin.action(description="Stop the selected queued or running experiments")
    def stop_experiments(self, request, queryset):
        stopped, skipped = 0, 0
        for experiment in queryset:
            try:
                experiment.request_stop()
                stopped += 1
            except InvalidTransition:
                skipped += 1
        self.message_user(request, f"asked {stopped} experiment(s) to stop; {skipped} were not running",
                          messages.SUCCESS if stopped else messages.WARNING)


@admin.register(OptimizationRun)
class OptimizationRunAdmin(admin.ModelAdmin):
    list_display = ("experiment", "technique", "status", "accuracy", "accuracy_drop", "size_bytes",
                    "compression_ratio", "latency_ms", "speedup", "finished_at")
    list_filter = ("status", "technique")
    search_fields = ("experiment__name", "technique", "error")
    readonly_fields = ("estimates", "constraints_met", "details")


@admin.register(ModelFile)
class ModelFileAdmin(admin.ModelAdmin):
    list_display = ("path", "experiment", "role", "technique", "kind", "format", "size_bytes", "created_at")
    list_filter = ("role", "kind", "format")
    search_fields = ("path", "sha256", "experiment__name")


@admin.register(Recommendation)
class RecommendationAdmin(admin.ModelAdmin):
    list_display = ("experiment", "technique", "satisfied", "created_at")
    list_filter = ("satisfied", "technique")
    search_fields = ("experiment__name", "reasoning")
    readonly_fields = ("ranking",)


@admin.register(ExperimentProgress)
class ExperimentProgressAdmin(admin.ModelAdmin):
    list_display = ("experiment", "status", "technique", "overall_progress", "eta_seconds", "seq", "updated_at")
    list_filter = ("status",)
    search_fields = ("experiment__name", "message")
    readonly_fields = ("metrics", "seq", "updated_at")


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Staff can see who has tokens and revoke one (delete); tokens are made by their users
    on the tokens page or with create_api_token, since only then can the token be shown."""

    list_display = ("name", "user", "hint", "created_at", "last_used_at")
    search_fields = ("name", "user__username", "hint")
    fields = ("user", "name", "hint", "created_at", "last_used_at")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False
