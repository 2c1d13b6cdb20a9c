"""The run's heartbeat and owner (experiments.attempts), and the reconciler's schedule."""
from django.db import migrations, models
from django.utils import timezone

RECONCILE_SCHEDULE = "edgeopt: re-queue abandoned experiments"  # attempts.RECONCILE_SCHEDULE


def create_reconcile_schedule(apps, schema_editor):
    """Every minute, the finest django-q2 schedules go (its scheduler looks every 30 s)."""
    Schedule = apps.get_model("django_q", "Schedule")
    Schedule.objects.update_or_create(
        name=RECONCILE_SCHEDULE,
        defaults={"func": "experiments.reconciler.reconcile", "schedule_type": "I", "minutes": 1,
                  "repeats": -1, "next_run": timezone.now()},
    )


def remove_reconcile_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=RECONCILE_SCHEDULE).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("experiments", "0004_plan"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [
        migrations.AddField(
            model_name="experiment",
            name="heartbeat_at",
            field=models.DateTimeField(blank=True, help_text="last sign of life of the run", null=True),
        ),
        migrations.AddField(
            model_name="experiment",
            name="worker_token",
            field=models.CharField(blank=True, help_text="the attempt that owns the run", max_length=32),
        ),
        migrations.RunPython(create_reconcile_schedule, remove_reconcile_schedule),
    ]
