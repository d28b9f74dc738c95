"""Helpers for fault tests: a private Redis that a test may kill and start again."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess

import redis

from tests.live import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """redis-server on ``port``, keeping nothing on disk: a restart loses every key,
    as a Redis without persistence (or one whose last snapshot is old) does."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    process = subprocess.Popen(  # noqa: S603 - the machine's redis-server, our arguments
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    wait_until(lambda: _pings(client), what=f"a private Redis on port {port}", timeout=10)
    return process


def kill_redis(process: subprocess.Popen) -> None:
    """SIGKILL: no snapshot, no goodbye to clients."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False
