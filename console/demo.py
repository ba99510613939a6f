"""The embedded demo: PostgreSQL + SeaweedFS S3 on loopback, seeded with a realistic data set.

``atc demo up --data-dir DIR`` starts both, creates the schemas, seeds once, and writes
``DIR/atc.toml``; ``atc demo down --data-dir DIR`` stops both; plain ``atc demo`` does up, opens
the TUI, and stops everything on exit.

No stray servers, whatever happens to the process that asked for them. The servers are not
children of the ``atc`` process but of a small *keeper* process (``python -m console.demo keeper
DIR``) in its own session:

- the servers are tied to the keeper with ``PR_SET_PDEATHSIG``: if the keeper dies, even by
  SIGKILL, the kernel signals them and they shut down;
- the keeper holds a pipe from the launcher (``atc demo`` / ``atc demo up``). If the launcher dies
  before it says "commit" (a crash, Ctrl-C, SIGTERM, SIGKILL in the middle of start or seeding),
  the keeper reads end-of-file and stops both servers;
- ``atc demo up`` says "commit" once everything is seeded and the config is written, so the keeper
  stays on its own until ``atc demo down`` sends it SIGTERM; plain ``atc demo`` never commits, so
  the servers live exactly as long as it does.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Settings, load_settings
from .embedded import EmbeddedPostgres, EmbeddedS3, pid_alive, pid_cmdline_contains
from .errors import AtcError

DEMO_DATABASE = "autotest"
DEMO_PROFILE = "atc-demo"
DEFAULT_SCALE = "small"
KEEPER_MARKER = "console.demo"
# How long starting both servers may take before the launcher gives up (weed is the slow one).
START_TIMEOUT = 120.0


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "atc" / "demo"


@dataclass
class DemoStack:
    data_dir: Path
    postgres: EmbeddedPostgres
    s3: EmbeddedS3
    keeper: subprocess.Popen | None = None
    # The broker simulator (console.broker_sim), started by the keeper once the data is seeded.
    broker_port: int = 0

    @property
    def broker(self):
        from .broker_sim import BrokerSimProcess

        return BrokerSimProcess(self.data_dir / "broker", port=self.broker_port)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "atc.toml"

    @property
    def state_path(self) -> Path:
        return self.data_dir / "demo.json"

    def settings(self) -> Settings:
        return load_settings(str(self.config_path))

    def write_config(self, operator: str = "") -> Path:
        creds = self.s3.aws_credentials_file(DEMO_PROFILE)
        text = f"""# Written by `atc demo up`; points atc at the embedded demo services.
# Every setting is documented with its default in sample-config.toml.
{f'operator = "{operator}"' if operator else '# operator = ""  (default: your login name)'}
read_only = false

[database]
dsn = "{self.postgres.dsn(DEMO_DATABASE)}"
statement_timeout = "5s"
lock_timeout = "1s"
idle_in_transaction_session_timeout = "10s"

[s3]
endpoint_url = "{self.s3.endpoint_url}"
region = "us-east-1"
bucket = "{self.s3.bucket}"
prefix = "atc/logs/"
# The demo's generated keys live in this AWS credentials file, read through boto3's own chain.
profile = "{DEMO_PROFILE}"
credentials_file = "{creds}"

[broker]
# The reference broker/runner simulator started with the demo (console.broker_sim).
url = "http://127.0.0.1:{self.broker_port}"
connect_timeout = 2.0
read_timeout = 10.0
retries = 2
# Short starvation thresholds so the demo's incident shows within seconds.
waiting_after = 10.0
assigned_grace = 10.0
stalled_after = 15.0
heartbeat_fresh = 10.0
not_started_after = 120.0
recovery_watch = 20.0
"""
        self.config_path.write_text(text)
        return self.config_path

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def update_state(self, **changes) -> dict:
        state = self.load_state()
        for key, value in changes.items():
            if value is None:
                state.pop(key, None)
            else:
                state[key] = value
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)
        return state

    def record_servers(self) -> None:
        self.update_state(postgres={"port": self.postgres.port, "pid": self.postgres.pid},
                          s3={"port": self.s3.s3_port, "pid": self.s3.pid, "endpoint": self.s3.endpoint_url},
                          broker={"port": self.broker_port},
                          keeper={"pid": os.getpid()})

    def adopt_recorded_servers(self) -> None:
        """Take ports and pids from the state file (written by the keeper)."""
        state = self.load_state()
        self.postgres.port = int(state.get("postgres", {}).get("port") or 0)
        self.postgres.pid = int(state.get("postgres", {}).get("pid") or 0)
        self.s3.s3_port = int(state.get("s3", {}).get("port") or 0)
        self.s3.pid = int(state.get("s3", {}).get("pid") or 0)
        self.s3.load_credentials()
        self.broker_port = int(state.get("broker", {}).get("port") or 0)

    def keeper_pid(self) -> int:
        pid = int(self.load_state().get("keeper", {}).get("pid") or 0)
        return pid if pid and pid_alive(pid) and pid_cmdline_contains(pid, KEEPER_MARKER) else 0

    def anything_running(self) -> bool:
        return bool(self.keeper_pid()) or self.postgres.is_running() or self.s3.is_running()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the keeper (which stops both servers), then anything left; True if anything ran."""
        was_running = False
        keeper = self.keeper
        if keeper is not None and keeper.poll() is None:
            was_running = True
            _close_quietly(keeper.stdin)
            keeper.terminate()
            try:
                keeper.wait(timeout)
            except subprocess.TimeoutExpired:
                keeper.kill()
                keeper.wait(5)
        else:
            pid = self.keeper_pid()
            if pid:
                was_running = True
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline and pid_alive(pid):
                    time.sleep(0.05)
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
        # Left-overs (a keeper killed before it could clean up: its servers got PDEATHSIG, but make
        # sure, by the pid files, that nothing of this data dir still runs).
        if self.postgres.is_running() or self.s3.is_running():
            was_running = True
        if self.broker.is_running():
            was_running = True
        self.broker.stop()
        self.s3.stop()
        self.postgres.stop()
        self.keeper = None
        return was_running


def _close_quietly(stream) -> None:
    try:
        if stream is not None:
            stream.close()
    except OSError:
        pass


def stack_for(data_dir: Path) -> DemoStack:
    data_dir = data_dir.expanduser().resolve()
    return DemoStack(data_dir=data_dir, postgres=EmbeddedPostgres(data_dir / "postgres"), s3=EmbeddedS3(data_dir / "s3"))


# ------------------------------------------------------------------------------------------------
# The launcher side
# ------------------------------------------------------------------------------------------------


def up(data_dir: Path, *, scale: str | None = None, fresh: bool = False, detach: bool = True,
       incident: bool = False, progress: Callable[[str], None] = lambda msg: None) -> DemoStack:
    """Start the services (on free ports), create schemas, seed if not yet seeded, write atc.toml.

    detach=True (``atc demo up``): the services keep running after this process exits.
    detach=False (plain ``atc demo``): they stop when this process exits, however it exits.
    """
    data_dir = data_dir.expanduser().resolve()
    if fresh and data_dir.exists():
        down(data_dir)
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = stack_for(data_dir)
    if stack.anything_running():
        raise AtcError(f"a demo is already running in {data_dir}; stop it with `atc demo down --data-dir {data_dir}`")
    seeded = stack.load_state().get("seeded")
    if scale is None:
        scale = seeded.get("scale", DEFAULT_SCALE) if seeded else DEFAULT_SCALE
    elif seeded and seeded.get("scale") != scale:
        raise AtcError(f"the demo in {data_dir} holds a {seeded.get('scale')} data set; "
                       f"add --fresh to start over at scale {scale}")
    stack.update_state(keeper=None)
    progress("starting PostgreSQL and SeaweedFS S3 on free loopback ports")
    stack.keeper = _launch_keeper(data_dir, progress)
    try:
        stack.adopt_recorded_servers()
        settings = stack.settings()
        from .schema import upgrade

        if not seeded:
            from .seed import seed_demo

            progress(f"seeding a {scale} data set")
            summary = seed_demo(settings, scale=scale, progress=progress)
            stack.update_state(seeded={"scale": scale, **summary})
        upgrade(settings)
        progress("starting the broker simulator" + (" and replaying the outage" if incident else ""))
        _start_broker(stack, incident=incident)
        if detach:
            stack.keeper.stdin.write(b"commit\n")
            stack.keeper.stdin.flush()
            _close_quietly(stack.keeper.stdin)
            _close_quietly(stack.keeper.stdout)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start_broker(stack: DemoStack, *, incident: bool, timeout: float = 60.0) -> None:
    """Ask the keeper to start the broker simulator (so it lives and dies with the other
    services), then wait until it answers on the configured URL."""
    import httpx

    stack.keeper.stdin.write(b"broker incident\n" if incident else b"broker\n")
    stack.keeper.stdin.flush()
    url = f"{stack.broker.url}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stack.keeper.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AtcError(f"the broker simulator did not answer on {url}; see {stack.broker.log_path}")


def _launch_keeper(data_dir: Path, progress: Callable[[str], None]) -> subprocess.Popen:
    log = open(data_dir / "keeper.log", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", KEEPER_MARKER, "keeper", str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True, cwd=str(data_dir),
        )
    finally:
        log.close()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT
    buffer = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                kind, _, message = line.decode("utf-8", "replace").partition(" ")
                if kind == "ready":
                    return proc
                if kind == "progress":
                    progress(message)
                elif kind == "error":
                    raise AtcError(message)
        raise AtcError(f"the demo services did not start within {START_TIMEOUT:.0f}s; see {data_dir / 'keeper.log'}")
    except BaseException:
        _close_quietly(proc.stdin)
        try:
            proc.terminate()
            proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
        raise
    finally:
        sel.close()


def down(data_dir: Path) -> bool:
    """Stop the demo's services; True if anything was running."""
    stack = stack_for(data_dir)
    if not stack.data_dir.exists():
        raise AtcError(f"no demo data directory at {stack.data_dir} (check --data-dir)")
    stack.adopt_recorded_servers()
    was_running = stack.stop()
    stack.update_state(keeper=None)
    return was_running


# ------------------------------------------------------------------------------------------------
# The keeper process
# ------------------------------------------------------------------------------------------------


def _keeper_main(data_dir: Path) -> int:
    stack = stack_for(data_dir)

    def say(kind: str, message: str = "") -> None:
        try:
            sys.stdout.write(f"{kind} {' '.join(message.split())}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # the launcher stopped listening; that is fine after "ready"

    def stop_on_signal(signum, frame):
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop_on_signal)
    try:
        stack.postgres.start(tie_to_parent=True)
        say("progress", f"PostgreSQL listening on 127.0.0.1:{stack.postgres.port}")
        stack.s3.start(tie_to_parent=True)
        say("progress", f"S3 listening on {stack.s3.endpoint_url}")
        stack.postgres.create_database(DEMO_DATABASE)
        from .embedded import free_ports

        stack.broker_port = free_ports(1)[0]
        stack.write_config()
        stack.record_servers()
        say("ready")
        committed = False
        for line in sys.stdin:
            if line.split()[:1] == ["broker"]:
                # Started here, tied to the keeper, once the launcher has seeded the database.
                broker = stack.broker
                broker.start(stack.postgres.dsn(DEMO_DATABASE), runners=6, demo_load_interval=20.0,
                             incident="incident" in line.split(), tie_to_parent=True)
                continue
            if line.strip() == "commit":
                committed = True
                break
        if not committed:
            return 0  # the launcher went away (crash, kill, or plain `atc demo` ending)
        # Detached: stay until `atc demo down` (SIGTERM); if a server dies, take the other down too.
        while stack.postgres.is_running() and stack.s3.is_running():
            time.sleep(1.0)
        return 1
    except AtcError as exc:
        say("error", exc.message)
        return 2
    except SystemExit:
        return 0
    finally:
        # A second signal must not interrupt the shutdown itself.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            stack.broker.stop()
            stack.s3.stop()
        finally:
            stack.postgres.stop()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "keeper":
        return _keeper_main(Path(argv[1]))
    sys.stderr.write("usage: python -m console.demo keeper DATA_DIR (started by `atc demo`)\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
