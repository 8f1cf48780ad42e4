"""A throwaway Postgres cluster with ``wal_level = logical``, for the WAL
source, as ``tests/src/logical.rs`` starts one for the Rust suite: the
shared server runs ``wal_level = replica`` and must not be reconfigured.

Started from the machine's binaries (``pg_config --bindir``) on a free
port, with its data in a temporary directory; as root (initdb refuses it)
the server runs as ``postgres``. ``fsync`` stays on by default, so commits
wait for the WAL flush as on a production server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LogicalCluster:
    """A running cluster; :meth:`stop` stops it and removes its data."""

    def __init__(self, *, fsync: bool = True) -> None:
        out = subprocess.run(["pg_config", "--bindir"], check=True, capture_output=True, text=True)
        self._bin = Path(out.stdout.strip())
        self._as_postgres = os.geteuid() == 0
        self.port = _free_port()
        self._data = Path(tempfile.mkdtemp(prefix="herald-py-pg-"))
        self._chown(self._data)
        self._run("initdb", "-D", str(self._data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{self._data}' "
            f"-c wal_level=logical -c max_replication_slots=16 -c max_wal_senders=16 "
            f"-c fsync={'on' if fsync else 'off'} -c max_connections=200 -c shared_buffers=128MB"
        )
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self._data),
                "-w",
                "-l",
                str(self._data / "server.log"),
                "-o",
                options,
                "start",
            )
        except Exception:
            shutil.rmtree(self._data, ignore_errors=True)
            raise

    @property
    def admin_url(self) -> str:
        """The cluster's ``postgres`` database, superuser."""
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self._data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self._data, ignore_errors=True)

    def _command(self, tool: str, *args: str) -> list[str]:
        path = str(self._bin / tool)
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return [*prefix, path, *args]

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(self._command(tool, *args), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stderr.strip()}")

    def _chown(self, path: Path) -> None:
        if self._as_postgres:
            subprocess.run(["chown", "-R", "postgres:postgres", str(path)], check=True)
