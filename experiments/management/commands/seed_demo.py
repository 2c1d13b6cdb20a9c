"""python manage.py seed_demo [--framework pytorch|tensorflow]

Puts the `digits` preset and the demo `digits_cnn` model(s) in storage, and makes a local
`demo` user so a newcomer is one login away from the demo. Its password is
EDGEOPT_DEMO_PASSWORD when set, else a random one, set and printed when the user has
none. Anything already there is kept, so running it twice does nothing the second time."""
import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.core.management.base import BaseCommand

from optimization.base import FRAMEWORKS

DEMO_USERNAME = "demo"


class Command(BaseCommand):
    help = "Put the demo dataset (digits), pretrained digits_cnn models and a `demo` user in place (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--framework", choices=FRAMEWORKS, help="seed only this framework's model")

    def handle(self, *args, framework=None, **options):
        self.ensure_demo_user()
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

    def ensure_demo_user(self) -> None:
        """Set the password from EDGEOPT_DEMO_PASSWORD, or a random one when the user has none
        (new, or made by the accounts migration for older experiments); else leave it."""
        user, _ = get_user_model().objects.get_or_create(username=DEMO_USERNAME,
                                                         defaults={"password": make_password(None)})
        password = os.getenv("EDGEOPT_DEMO_PASSWORD")
        if password:
            if not user.check_password(password):
                user.set_password(password)
                user.save(update_fields=["password"])
            self.stdout.write(self.style.SUCCESS(f"log in as {DEMO_USERNAME} with EDGEOPT_DEMO_PASSWORD"))
        elif not user.has_usable_password():
            password = secrets.token_urlsafe(12)
            user.set_password(password)
            user.save(update_fields=["password"])
            self.stdout.write(self.style.SUCCESS(f"log in as {DEMO_USERNAME} with password {password}"))
        else:
            self.stdout.write(f"the {DEMO_USERNAME} user has its password already (`manage.py changepassword "
                              f"{DEMO_USERNAME}` or EDGEOPT_DEMO_PASSWORD sets a new one)")
