"""python manage.py seed_demo [--framework pytorch|tensorflow]

Puts the `digits` preset and the demo `digits_cnn` model(s) in storage; anything already
there is kept, so running it twice does nothing the second time."""
from django.conf import settings
from django.core.management.base import BaseCommand

from optimization.base import FRAMEWORKS


class Command(BaseCommand):
    help = "Put the demo dataset (digits) and pretrained digits_cnn models in storage (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--framework", choices=FRAMEWORKS, help="seed only this framework's model")

    def handle(self, *args, framework=None, **options):
        # Imported here: training imports torch / tensorflow, which `manage.py help` should not.
        from optimization.demo import seed_demo

        frameworks = (framework,) if framework else FRAMEWORKS
        root = settings.EDGEOPT_STORAGE_ROOT
        self.stdout.write(f"seeding {', '.join(frameworks)} demo into {root}")
        written = seed_demo(root, frameworks=frameworks, log=self.stdout.write)
        if written:
            self.stdout.write(self.style.SUCCESS(f"wrote {len(written)} file(s)"))
        else:
            self.stdout.write(self.style.SUCCESS("nothing to do: the demo is already in storage"))
