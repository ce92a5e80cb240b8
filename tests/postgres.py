"""A throwaway PostgreSQL server for tests, from Debian's server binaries (package ``postgresql``).

``postgres_server()`` runs initdb and pg_ctl in a fresh temporary folder (as ``nobody`` when the tests run as
root, because PostgreSQL refuses to run as root), listens only on a unix socket inside that folder, yields a
SQLAlchemy URL for its ``postgres`` database and stops and removes it afterwards. ``create_database()`` makes a
fresh empty database on it, so each test gets its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb and pg_ctl): install the Debian "
    "package `postgresql` (apt-get install -y postgresql) to run the PostgreSQL variants of these tests"
)
PORT = 5432  # only names the socket file; no TCP listener is opened


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bin_dir = Path(initdb).parent
        version = bin_dir.parent.name
        if (bin_dir / "pg_ctl").exists() and version.replace(".", "").isdigit():
            found.append((float(version), bin_dir))
    return max(found)[1] if found else None


def missing_reason() -> str | None:
    """Why the PostgreSQL variants cannot run here, or None if they can."""
    if find_bin_dir() is None:
        return INSTALL_HINT
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (v3) is not installed: pip install 'psycopg[binary]'"
    return None


def _run(cmd: list[str], as_user: pwd.struct_passwd | None, cwd: Path) -> None:
    kwargs = {"user": as_user.pw_uid, "group": as_user.pw_gid, "extra_groups": []} if as_user else {}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a server, yield ``postgresql+psycopg://postgres@/postgres?host=<socket dir>``, stop it."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise RuntimeError(INSTALL_HINT)
    as_user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    # Short path under /tmp: a unix socket path must stay under ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="llmpress-pg-"))
    data = root / "data"
    if as_user is not None:
        os.chown(root, as_user.pw_uid, as_user.pw_gid)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
              "--no-sync", "--locale=C"], as_user, root)
        # Durability off: a test database is thrown away anyway, and fsync dominates small transactions.
        options = (f"-k {root} -p {PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=50")
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w",
              "-t", "60", "start"], as_user, root)
        try:
            yield f"postgresql+psycopg://postgres@/postgres?host={root}&port={PORT}"
        finally:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], as_user, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str) -> str:
    """A new empty database on the server; returns its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(server_url)
    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=url.query["host"], port=url.query["port"], user=url.username,
                         dbname=url.database, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.set(database=name).render_as_string(hide_password=False)
