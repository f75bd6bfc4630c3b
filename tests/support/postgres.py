"""A private PostgreSQL server on loopback for the real-server tests (the Debian packages' binaries).

``initdb`` a fresh cluster in a temporary folder owned by the ``postgres`` user (PostgreSQL refuses
to run as root), password authentication over TCP on 127.0.0.1 (as in production), one database
for Prefect. :func:`dump` is ``pg_dump`` of that database as text (the canary scan reads it).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class Postgres:
    def __init__(self, port: int) -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(
                f"PostgreSQL binaries not found in {PG_BIN}: install the Debian package `postgresql`"
            )
        self.port = port
        self.password = secrets.token_hex(12)
        self.root = Path(tempfile.mkdtemp(prefix="octomed-pg-"))
        self.data = self.root / "data"
        self.database = "prefect"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Prefect takes (``PREFECT_API_DATABASE_CONNECTION_URL``)."""
        return f"postgresql+asyncpg://postgres:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _as_postgres(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        env = dict(os.environ, PGPASSWORD=self.password)
        return subprocess.run([*user, *cmd], check=True, capture_output=True, text=True, env=env, **kw)

    def start(self) -> Postgres:
        pw = self.root / "pw"
        pw.write_text(self.password)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for p in (self.root, pw):
                os.chown(p, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", f"--pwfile={pw}",
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
        opts += " -c fsync=off"
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        self._psql(f"CREATE DATABASE {self.database}")
        return self

    def _psql(self, sql: str, database: str = "postgres") -> str:
        cmd = [str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return self._as_postgres(*cmd, "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql).stdout

    def dump(self) -> str:
        """The whole Prefect database as SQL text."""
        cmd = [str(PG_BIN / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        return self._as_postgres(*cmd, self.database, timeout=120).stdout

    def tables(self) -> int:
        return int(self._psql("SELECT count(*) FROM pg_tables WHERE schemaname='public'", self.database))

    def stop(self) -> None:
        try:
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass
        for _ in range(20):
            if not (self.data / "postmaster.pid").exists():
                break
            time.sleep(0.25)
        shutil.rmtree(self.root, ignore_errors=True)
