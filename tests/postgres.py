"""A real PostgreSQL server for the tests: Debian's binaries, a cluster in a temporary directory, a
free port on loopback, trust authentication. As root it runs as the `postgres` user (the server
refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from services.launcher import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql (apt-get install -y postgresql)")
        self.root = Path(tempfile.mkdtemp(prefix="llmmesh-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        if self.as_user:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        return self.restart()

    def restart(self) -> "PostgresServer":
        """Start the server on its cluster (again, after kill()); commit timestamps are kept, so a test
        can read each row's commit order."""
        # pg_ctl -w returns once the server accepts connections (or fails, with its log).
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                  "-o", f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c track_commit_timestamp=on",
                  "start")
        return self

    def kill(self) -> None:
        """Killed as a crash would (immediate shutdown: no checkpoint, recovery at the next start); the
        cluster stays for restart()."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def processes(self) -> list:
        """The postmaster and every backend it runs (what SIGSTOP must reach for the server to hang)."""
        import psutil

        postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split()[0]))
        return [postmaster, *postmaster.children(recursive=True)]

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query, through psql, as text fields."""
        out = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-AtF", "\t", "-c", query], check=True, capture_output=True, timeout=60, text=True).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def stop(self) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def dump(self) -> bytes:
        """pg_dump of the database: the documented backup."""
        return subprocess.run([str(self.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "postgres"], check=True, capture_output=True, timeout=120).stdout
