"""Accounts: every experiment gets an owner, and users get API tokens.

Experiments made before accounts existed are given to a `demo` user (made here, without
a usable password, if there are such experiments and no such user). `manage.py seed_demo`,
which `make run` calls, then sets its password and prints it, so the past experiments of a
local set-up are one login away. The owner can then be made NOT NULL: no experiment is
without one, and no "ownerless" case is left for the visibility rule to decide."""
import django.db.models.deletion
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.db import migrations, models

DEMO_USERNAME = "demo"


def give_existing_experiments_to_demo(apps, schema_editor):
    Experiment = apps.get_model("experiments", "Experiment")
    ownerless = Experiment.objects.filter(owner__isnull=True)
    if not ownerless.exists():
        return
    app_label, model_name = settings.AUTH_USER_MODEL.split(".")
    User = apps.get_model(app_label, model_name)
    demo = User.objects.filter(username=DEMO_USERNAME).first()
    if demo is None:
        demo = User.objects.create(username=DEMO_USERNAME, password=make_password(None))  # unusable
    ownerless.update(owner=demo)


class Migration(migrations.Migration):

    dependencies = [
        ("experiments", "0002_measurement_spread"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name="experiment",
            name="owner",
            field=models.ForeignKey(null=True, on_delete=django.db.models.deletion.PROTECT,
                                    related_name="experiments", to=settings.AUTH_USER_MODEL),
        ),
        migrations.RunPython(give_existing_experiments_to_demo, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="experiment",
            name="owner",
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT,
                                    related_name="experiments", to=settings.AUTH_USER_MODEL),
        ),
        migrations.CreateModel(
            name="ApiToken",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100)),
                ("token_hash", models.CharField(max_length=64, unique=True)),
                ("hint", models.CharField(help_text="the token's first characters, to tell tokens apart",
                                          max_length=12)),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("last_used_at", models.DateTimeField(blank=True, null=True)),
                ("user", models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name="api_tokens",
                                           to=settings.AUTH_USER_MODEL)),
            ],
            options={
                "db_table": "api_tokens",
                "ordering": ["-created_at", "-id"],
            },
        ),
    ]
