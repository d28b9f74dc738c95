from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.db.backends.signals import connection_created
from django.test import Client

from apps.accounts.models import Role, User
from apps.audit.signing import create_key

PASSWORD = "correct horse battery staple"

# One named user per role, used across the suite.
ROLE_USERS = {
    Role.ADMIN: "ada",
    Role.DATA_SCIENTIST: "dana",
    Role.APP_DEVELOPER: "devon",
    Role.COMPLIANCE_OFFICER: "cora",
}


def _allow_flushing_the_audit_log(sender, connection, **kwargs) -> None:
    # Transactional tests empty every table with TRUNCATE between tests; the audit log's
    # trigger refuses that unless the session says so (apps/audit/migrations/0004).
    with connection.cursor() as cursor:
        cursor.execute("SET aibox.allow_audit_truncate = 'on'")


connection_created.connect(_allow_flushing_the_audit_log)


@pytest.fixture(scope="session", autouse=True)
def audit_signing_key_file(tmp_path_factory) -> Path:
    """One audit signing key for the run, never var/'s: for this process and, through the
    environment, for the workers and web servers the tests start."""
    path = tmp_path_factory.mktemp("audit-key") / "audit-signing-key.pem"
    create_key(path)
    os.environ["AIBOX_AUDIT_SIGNING_KEY_FILE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _test_settings(settings, tmp_path, audit_signing_key_file):
    settings.AUDIT_SIGNING_KEY_FILE = audit_signing_key_file
    # Never the box's own checkpoint file under var/.
    settings.AUDIT_CHECKPOINT_FILE = tmp_path / "audit-checkpoints.jsonl"
    # A deliberately slow password hash is the point in production, not in tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Production uses whitenoise's manifest storage, which needs collectstatic first.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def make_user(role: Role, username: str | None = None, **extra) -> User:
    user = User(username=username or ROLE_USERS[role], role=role, **extra)
    user.set_password(PASSWORD)
    user.save()
    return user


@pytest.fixture
def users(db) -> dict[Role, User]:
    return {role: make_user(role) for role in ROLE_USERS}


@pytest.fixture
def admin_user(users) -> User:
    return users[Role.ADMIN]


def client_for(user: User) -> Client:
    client = Client(HTTP_USER_AGENT="pytest-client", REMOTE_ADDR="10.9.8.7")
    client.force_login(user)
    return client


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright; never a downloaded browser."""
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium"):
        pytest.fail(
            "Chromium is not installed: run 'apt-get install chromium' (bin/aibox test does)."
        )
    # Playwright's sync API keeps an event loop running in this thread; the ORM calls
    # the tests make around it are still plain synchronous code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()
    del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture(scope="session")
def test_database(django_db_setup, django_db_blocker):
    """The test database, for fixtures that use it outside a test's transaction.

    pytest-django creates it only when a collected test asks for the database by marker
    or by the ``db`` fixture. A run of only tests that reach it through session fixtures
    (a live stack, a million audit events) would otherwise write to the database that
    DATABASE_URL names, which is the developer's own.
    """
    from django.conf import settings
    from django.test.utils import setup_databases, teardown_databases

    if settings.DATABASES["default"]["NAME"].startswith("test_"):
        yield
        return
    with django_db_blocker.unblock():
        config = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    _close_pools()
    with django_db_blocker.unblock():
        teardown_databases(config, verbosity=0)


def _close_pools() -> None:
    """Close the pools, then end the sessions that threads still hold checked out.

    A pool's ``close`` leaves a connection that a thread has checked out open until it
    comes back, and some never do: asgiref's executor thread and the live server's
    request threads (kept alive by a browser) outlive their tests. The test database
    can only be dropped without them, as ``DROP DATABASE ... WITH (FORCE)`` would.
    """
    import psycopg
    from django.db import connections

    for connection in connections.all():
        close_pool = getattr(connection, "close_pool", None)
        if close_pool is not None:
            close_pool()
    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    name = params.pop("dbname", None)
    if not name or not name.startswith("test_"):
        return
    with psycopg.connect(**{**params, "dbname": "postgres"}, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )


@pytest.fixture(scope="session", autouse=True)
def _close_connection_pools(django_db_setup):
    """Django's connection pool keeps connections open; close it before the test database
    is dropped."""
    yield
    _close_pools()


@dataclass
class LiveWorker:
    name: str
    artifact_root: Path
    process: subprocess.Popen


@pytest.fixture(scope="session")
def live_worker(test_database, tmp_path_factory) -> Iterator[LiveWorker]:
    """A real Celery worker (prefork, so it never holds a deployment) on the test
    database, for tests of background jobs. Tests that use it point
    ``settings.ARTIFACT_ROOT`` at ``live_worker.artifact_root`` and commit their rows
    (``django_db(transaction=True)``)."""
    from tests.live import process_env, start_celery_worker, stop_processes

    root = tmp_path_factory.mktemp("live-artifacts")
    logs = tmp_path_factory.mktemp("live-worker")
    name = f"jobs-{uuid.uuid4().hex[:6]}@localhost"
    process = start_celery_worker(
        env=process_env(AIBOX_ARTIFACT_ROOT=str(root)),
        name=name,
        log=logs / "worker.log",
        pool="prefork",
        concurrency=2,
    )
    try:
        yield LiveWorker(name=name, artifact_root=root, process=process)
    finally:
        stop_processes([process])


# The converted checkpoint (keyed by the GGUF's sha256) outlives a test run, so only the
# first run on a machine pays for converting the GGUF.
CONVERT_CACHE = Path(
    os.environ.get("AIBOX_TEST_FINETUNE_CACHE", Path.home() / ".cache" / "aibox-test-finetune")
)


# Short, so a test sees a killed worker's job fail within seconds; long enough that a
# busy two-core machine never starves the heartbeat thread that long.
HEARTBEAT_TTL = "8"


@dataclass
class TrainingWorker:
    """The session's training worker, which a test may kill and start again."""

    env: dict[str, str]
    logs: Path
    name: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> None:
        from tests.live import start_celery_worker

        self.name = f"train-{uuid.uuid4().hex[:6]}@localhost"
        self.process = start_celery_worker(
            env=self.env,
            name=self.name,
            log=self.logs / f"{self.name.split('@')[0]}.log",
            pool="solo",
            concurrency=1,
            queues="training,optimise",
        )

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no cleanup, as when a machine loses power."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture(scope="session")
def training_worker(live_worker, tmp_path_factory) -> Iterator[TrainingWorker]:
    from tests.live import process_env, stop_processes

    worker = TrainingWorker(
        env=process_env(
            AIBOX_ARTIFACT_ROOT=str(live_worker.artifact_root),
            # Kept across restarts, so a retried job finds its checkpoints.
            AIBOX_FINETUNE_WORK_DIR=str(tmp_path_factory.mktemp("finetune-work")),
            AIBOX_FINETUNE_CACHE_DIR=str(CONVERT_CACHE),
            AIBOX_FINETUNE_DEVICE="cpu",
            AIBOX_FINETUNE_HEARTBEAT_TTL=HEARTBEAT_TTL,
            AIBOX_WORKER_SERVING="false",
        ),
        logs=tmp_path_factory.mktemp("training-worker"),
    )
    worker.start()
    try:
        yield worker
    finally:
        stop_processes([worker.process])


@dataclass
class ControlPlane:
    url: str
    token: str
    name: str


@pytest.fixture
def control_plane(users, live_worker, tmp_path) -> Iterator[ControlPlane]:
    """A uvicorn of the stack (on the live worker's artifact store) and a worker
    credential, for a worker on "another host" to reach it."""
    from apps.deployments.credentials import worker_credential_issue, worker_credential_revoke
    from tests.live import process_env, start_web_server, stop_processes

    name = f"trainer-{uuid.uuid4().hex[:6]}@otherhost"
    issued = worker_credential_issue(actor=users[Role.ADMIN], name=name)
    process, url = start_web_server(
        env=process_env(AIBOX_ARTIFACT_ROOT=str(live_worker.artifact_root)),
        log=tmp_path / "web.log",
    )
    try:
        yield ControlPlane(url=url, token=issued.secret, name=name)
    finally:
        stop_processes([process])
        worker_credential_revoke(actor=users[Role.ADMIN], credential=issued.credential)


@dataclass
class RemoteTrainer:
    name: str
    cache: Path
    work: Path
    log: Path


@contextmanager
def remote_trainer_running(
    control_plane: ControlPlane, training_worker: TrainingWorker, folder: Path, *, queues: str
) -> Iterator[RemoteTrainer]:
    """A training worker on "another host" taking ``queues``: no database (its
    DATABASE_URL reaches nothing), an empty artifact root, its own model cache and secret
    key, and ``AIBOX_CONTROL_PLANE_URL`` with the credential. The session's training
    worker is stopped meanwhile, so the jobs can only go to this one, and started again
    afterwards. (It shares the machine's cache of converted checkpoints,
    ``CONVERT_CACHE``, only so a test does not convert the GGUF again.)"""
    from tests.live import process_env, start_celery_worker, stop_processes

    other_host = folder / "otherhost"
    cache, work, store = other_host / "model-cache", other_host / "work", other_host / "store"
    for path in (cache, work, store):
        path.mkdir(parents=True)
    trainer = RemoteTrainer(
        name=control_plane.name, cache=cache, work=work, log=folder / "trainer.log"
    )
    env = {
        **process_env(),
        "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none",
        "AIBOX_SECRET_KEY": secrets.token_hex(24),
        "AIBOX_ARTIFACT_ROOT": str(store),
        "AIBOX_MODEL_CACHE_DIR": str(cache),
        "AIBOX_FINETUNE_WORK_DIR": str(work),
        "AIBOX_FINETUNE_CACHE_DIR": str(CONVERT_CACHE),
        "AIBOX_FINETUNE_DEVICE": "cpu",
        "AIBOX_FINETUNE_HEARTBEAT_TTL": HEARTBEAT_TTL,
        "AIBOX_WORKER_SERVING": "false",
        "AIBOX_CONTROL_PLANE_URL": control_plane.url,
        "AIBOX_WORKER_TOKEN": control_plane.token,
    }
    stop_processes([training_worker.process])
    process = None
    try:
        process = start_celery_worker(
            env=env, name=trainer.name, log=trainer.log, pool="solo", concurrency=1, queues=queues
        )
        yield trainer
    finally:
        if process is not None:
            stop_processes([process])
        training_worker.start()
    assert control_plane.token not in trainer.log.read_text(errors="replace"), "token logged"


@pytest.fixture
def fake_hub():
    """A Hugging Face hub on 127.0.0.1 (tests/hubserver.py): ``fake_hub.url`` is its
    endpoint, ``fake_hub.add_file(repo_id, filename, data, ...)`` commits a file."""
    from tests.hubserver import FakeHub

    hub = FakeHub().start()
    try:
        yield hub
    finally:
        hub.stop()
