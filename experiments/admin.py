from django.contrib import admin, messages

from .models import Experiment, ExperimentProgress, InvalidTransition, ModelFile, OptimizationRun, Recommendation


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
    list_display = ("id", "name", "framework", "target_device", "dataset", "goal", "status", "attempts",
                    "created_at", "finished_at")
    list_filter = ("status", "framework", "target_device", "goal")
    search_fields = ("name", "dataset", "error")
    readonly_fields = ("status", "stop_requested", "attempts", "error", "baseline", "analysis",
                       "created_at", "started_at", "finished_at")
    inlines = [OptimizationRunInline, ModelFileInline]
    actions = ["stop_experiments"]

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
