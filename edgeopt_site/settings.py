"""EdgeOpt settings. Everything comes from the environment; a bad value stops start-up
with ImproperlyConfigured instead of running with a silent default.

    SECRET_KEY / SECRET_KEY_FILE   required unless DEBUG
    DEBUG                          true|false (default true: the local dev setup)
    ALLOWED_HOSTS                  comma list
    DATABASE_URL                   sqlite:///path or postgres://... (default: BASE_DIR/db.sqlite3)
    EDGEOPT_STORAGE_ROOT           where models/ and dataset/ live (default BASE_DIR)
    EDGEOPT_MAX_UPLOAD_MB          larger uploads get 413 (default 200)
    EDGEOPT_MAX_DATASET_MB         the most an uploaded .npz may declare unpacked (default 1024)
    EDGEOPT_TASK_TIMEOUT           seconds one experiment may run in the worker (default 3600)
    EDGEOPT_MAX_ATTEMPTS           runs of one experiment before it is marked failed (default 2)
    EDGEOPT_STALE_AFTER_S          a running experiment silent this long is re-queued (default 90)
    EDGEOPT_BROKER                 orm|redis: where django-q2 queues tasks (default orm: the database)
    EDGEOPT_WORKERS                worker processes per qcluster (default 1)
    CHANNEL_LAYER                  memory|redis: how progress reaches WebSockets (default memory)
    REDIS_URL                      redis://host:port/db for the two above (default redis://127.0.0.1:6379/0)
    EDGEOPT_PROGRESS_POLL_MS       how often a WebSocket re-reads progress; 0: only pushes
                                   (default 250 with CHANNEL_LAYER=memory, 5000 with redis)
    EDGEOPT_ALLOW_SIGNUP           true|false: anyone who reaches the server may make an account (default true)
    EDGEOPT_MAX_ACTIVE_PER_USER    queued + running experiments one user may have (default 2)
    EDGEOPT_MAX_STORAGE_MB_PER_USER  stored files one user may have (default 2048)
    EDGEOPT_LOGIN_FAILURE_LIMIT    failed logins (one username from one address) before a lock-out (default 5)
    EDGEOPT_LOGIN_COOLOFF_MINUTES  how long that lock-out lasts (default 15)
    EDGEOPT_DEMO_PASSWORD          the `demo` user's password (seed_demo; default: a random one, printed)
    CSRF_TRUSTED_ORIGINS           comma list of https://host origins
    SECURE_SSL_REDIRECT, SECURE_HSTS_SECONDS, SECURE_HSTS_INCLUDE_SUBDOMAINS, SECURE_HSTS_PRELOAD,
    SESSION_COOKIE_SECURE, CSRF_COOKIE_SECURE   Django's settings of those names (default off)
    BEHIND_TLS_PROXY               true: trust X-Forwarded-Proto: https from the proxy
"""
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def envbool(name: str, default: str) -> bool:
    value = os.getenv(name, default).strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name} must be one of true/false/1/0/yes/no/on/off, not {value!r}")


def envint(name: str, default: str, minimum: int = 0) -> int:
    value = os.getenv(name, default).strip()
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, not {value!r}") from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, not {number}")
    return number


def envchoice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.getenv(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {'/'.join(choices)}, not {value!r}")
    return value


def redis_url(url: str) -> str:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(f"REDIS_URL must start with redis://, rediss:// or unix://, not {url!r}")
    return url


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.getenv(name, default).split(",") if item.strip()]


def read_secret_key(debug: bool) -> str:
    if key_file := os.getenv("SECRET_KEY_FILE"):
        try:
            return Path(key_file).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"SECRET_KEY_FILE {key_file!r} cannot be read: {exc}") from None
    if key := os.getenv("SECRET_KEY"):
        return key
    if debug:
        return "django-insecure-edgeopt-local-development-only"
    raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is false")


SQLITE_OPTIONS = {
    # The web process and the worker write the same file: wait for the lock instead of
    # failing, take the write lock when a transaction starts (no deadlocking upgrade from
    # a read lock), and let readers run alongside the writer (WAL).
    "timeout": 30,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
}


def database_config(url: str, base_dir: Path) -> dict:
    """The default database from a URL; only SQLite and PostgreSQL are supported."""
    try:
        config = dj_database_url.parse(url, conn_max_age=0)
    except (ValueError, KeyError) as exc:
        raise ImproperlyConfigured(f"DATABASE_URL {url!r} cannot be parsed: {exc}") from None
    engine = config.get("ENGINE", "")
    if engine == "django.db.backends.sqlite3":
        if not config.get("NAME") or config["NAME"] == ":memory:":
            raise ImproperlyConfigured(
                "DATABASE_URL must name a SQLite file: the web and the worker processes share it"
            )
        config["OPTIONS"] = dict(SQLITE_OPTIONS)
        # A file, not memory: the end-to-end test points real server and worker processes at
        # it. One per test run (pid), so two runs in one checkout do not share it.
        config["TEST"] = {"NAME": str(base_dir / f"test_db_{os.getpid()}.sqlite3")}
    elif engine == "django.db.backends.postgresql":
        config.setdefault("OPTIONS", {})
        # A worker holds its connection for a whole run: after a PostgreSQL restart it is checked
        # and replaced instead of failing (the sink also retries a write once, see sink.py).
        config["CONN_HEALTH_CHECKS"] = True
    else:
        raise ImproperlyConfigured(
            f"DATABASE_URL uses {engine or 'an unknown engine'}; use sqlite:///path or postgres://..."
        )
    return config


DEBUG = envbool("DEBUG", "true")
SECRET_KEY = read_secret_key(DEBUG)
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

# HTTPS behind a proxy: what `manage.py check --deploy` asks for, each from the environment
# (off by default, so `make run` works on plain http://127.0.0.1).
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", "false")
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", "0")
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", "false")
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", "false")
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", "false")
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", "false")
# "true" when a proxy terminates TLS and sets X-Forwarded-Proto (only then: else clients could forge it).
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if envbool("BEHIND_TLS_PROXY", "false") else None

INSTALLED_APPS = [
    "daphne",  # first: its runserver serves HTTP and WebSocket
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_q",
    "channels",
    "django_htmx",
    "axes",
    "experiments",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files with DEBUG off too (a team's server), from STATIC_ROOT after collectstatic.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as django-axes asks: turns a lock-out raised during login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "edgeopt_site.urls"
WSGI_APPLICATION = "edgeopt_site.wsgi.application"
ASGI_APPLICATION = "edgeopt_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "experiments.accounts.account_links",
            ],
        },
    },
]

DATABASES = {
    "default": database_config(
        os.getenv("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"), BASE_DIR
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Scale-out (docs/architecture.md, "Running on several machines"): the default needs no
# server beyond the database; redis for either lets several machines share the work.
EDGEOPT_BROKER = envchoice("EDGEOPT_BROKER", "orm", ("orm", "redis"))
CHANNEL_LAYER = envchoice("CHANNEL_LAYER", "memory", ("memory", "redis"))
REDIS_URL = redis_url(os.getenv("REDIS_URL", "redis://127.0.0.1:6379/0").strip())
EDGEOPT_WORKERS = envint("EDGEOPT_WORKERS", "1", minimum=1)

# memory does not cross processes, so progress from the worker reaches the browser through the
# experiment_progress row, polled (see consumers.py); redis pushes it to every web process.
if CHANNEL_LAYER == "redis":
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                  "CONFIG": {"hosts": [REDIS_URL]}}}
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
EDGEOPT_PROGRESS_POLL_MS = envint("EDGEOPT_PROGRESS_POLL_MS", "5000" if CHANNEL_LAYER == "redis" else "250")

EDGEOPT_STORAGE_ROOT = Path(os.getenv("EDGEOPT_STORAGE_ROOT", str(BASE_DIR))).resolve()
EDGEOPT_MAX_UPLOAD_MB = envint("EDGEOPT_MAX_UPLOAD_MB", "200", minimum=1)
# What an uploaded .npz may declare once unpacked (its headers are read at upload).
EDGEOPT_MAX_DATASET_MB = envint("EDGEOPT_MAX_DATASET_MB", "1024", minimum=1)
EDGEOPT_TASK_TIMEOUT = envint("EDGEOPT_TASK_TIMEOUT", "3600", minimum=1)
EDGEOPT_MAX_ATTEMPTS = envint("EDGEOPT_MAX_ATTEMPTS", "2", minimum=1)
EDGEOPT_STALE_AFTER_S = envint("EDGEOPT_STALE_AFTER_S", "90", minimum=2)

# Accounts: pages need a login, the API a session or an API token (experiments/auth.py).
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "experiments:setup"
LOGOUT_REDIRECT_URL = "login"
EDGEOPT_ALLOW_SIGNUP = envbool("EDGEOPT_ALLOW_SIGNUP", "true")
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# django-axes counts failed logins; its backend must come first to refuse a locked-out login.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = envint("EDGEOPT_LOGIN_FAILURE_LIMIT", "5", minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=envint("EDGEOPT_LOGIN_COOLOFF_MINUTES", "15", minimum=1))
# Per username and address together: behind a proxy every client has the proxy's address,
# and locking by address alone would lock the whole team out.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
# Quotas, checked when an experiment starts (429) and when a file is uploaded (413).
EDGEOPT_MAX_ACTIVE_PER_USER = envint("EDGEOPT_MAX_ACTIVE_PER_USER", "2", minimum=1)
EDGEOPT_MAX_STORAGE_MB_PER_USER = envint("EDGEOPT_MAX_STORAGE_MB_PER_USER", "2048", minimum=1)

# Uploads above this stream to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024

Q_CLUSTER = {
    "name": "edgeopt",
    "label": "EdgeOpt tasks",
    **({"redis": REDIS_URL} if EDGEOPT_BROKER == "redis" else {"orm": "default"}),
    # Default one experiment at a time: each one uses every core it gets.
    "workers": EDGEOPT_WORKERS,
    # Fetch no more tasks ahead than there are workers, so idle machines get the rest.
    "queue_limit": EDGEOPT_WORKERS,
    "timeout": EDGEOPT_TASK_TIMEOUT,
    # The ORM broker hands a task out again after `retry` seconds. The reconciler re-queues a
    # dead worker's experiment long before, and the claim keeps a late copy from running it twice.
    "retry": EDGEOPT_TASK_TIMEOUT + 600,
    # Our task counts its own attempts (a worker that died is not counted by django-q2).
    "max_attempts": 1,
    "poll": 0.5,
    "catch_up": False,
    "ack_failures": True,
    "save_limit": 250,
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = Path(os.getenv("STATIC_ROOT", str(BASE_DIR / "staticfiles")))  # collectstatic writes here

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.getenv("LOG_LEVEL", "INFO")},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django_q": {"handlers": ["console"], "level": "INFO", "propagate": False},
        # torch's ONNX exporter logs each of its graph passes at INFO: dozens of lines per export
        "onnx_ir": {"level": "WARNING"},
        "onnxscript": {"level": "WARNING"},
    },
}
