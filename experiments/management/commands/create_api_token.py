"""python manage.py create_api_token USERNAME [--name N] [--create-user]

Makes an API token for USERNAME and prints it alone on stdout, so a script can take it:
`TOKEN=$(python manage.py create_api_token demo)`. --create-user makes the user first when
there is none (with no password: it can use the API, and log in once one is set)."""
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from experiments.models import ApiToken


class Command(BaseCommand):
    help = "Make an API token for a user and print it alone on stdout (it is stored hashed, shown only now)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="command line", help="what the token is for (shown on the tokens page)")
        parser.add_argument("--create-user", action="store_true", help="make the user if there is none")

    def handle(self, *args, username, name, create_user, **options):
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        if user is None:
            if not create_user:
                raise CommandError(f"there is no user {username!r}; pass --create-user to make one")
            user = User.objects.create_user(username=username)  # no password: unusable until set
            self.stderr.write(f"made user {username!r} (no password; `manage.py changepassword {username}` sets one)")
        elif not user.is_active:
            raise CommandError(f"user {username!r} is inactive: its tokens would be refused")
        _, token = ApiToken.issue(user, name)
        self.stdout.write(token)
