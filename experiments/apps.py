from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "experiments"
    verbose_name = "Experiments"

    def ready(self):
        from .cluster import prepare_if_qcluster

        prepare_if_qcluster()  # the graceful stop and start-up reconcile of `manage.py qcluster`
