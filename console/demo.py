"""The embedded demo: PostgreSQL + SeaweedFS S3 on loopback, seeded with a realistic data set.

``atc demo up --data-dir DIR`` starts both, creates the schemas, seeds once, and writes
``DIR/atc.toml``; ``atc demo down --data-dir DIR`` stops both; plain ``atc demo`` does up, opens
the TUI, and stops everything on exit (also on Ctrl-C or a crash: the servers are tied to the
process with PR_SET_PDEATHSIG besides the normal cleanup).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Settings, load_settings
from .embedded import EmbeddedPostgres, EmbeddedS3
from .errors import AtcError

DEMO_DATABASE = "autotest"
DEMO_PROFILE = "atc-demo"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "atc" / "demo"


@dataclass
class DemoStack:
    data_dir: Path
    postgres: EmbeddedPostgres
    s3: EmbeddedS3

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
"""
        self.config_path.write_text(text)
        return self.config_path

    def save_state(self, seeded: dict | None = None) -> None:
        state = {
            "postgres": {"port": self.postgres.port, "pid": self.postgres.pid},
            "s3": {"port": self.s3.s3_port, "pid": self.s3.pid},
        }
        if seeded is not None:
            state["seeded"] = seeded
        elif self.state_path.exists():
            old = json.loads(self.state_path.read_text())
            if "seeded" in old:
                state["seeded"] = old["seeded"]
        self.state_path.write_text(json.dumps(state, indent=2))

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self) -> None:
        self.s3.stop()
        self.postgres.stop()


def stack_for(data_dir: Path) -> DemoStack:
    data_dir = data_dir.expanduser().resolve()
    return DemoStack(data_dir=data_dir, postgres=EmbeddedPostgres(data_dir / "postgres"), s3=EmbeddedS3(data_dir / "s3"))


def up(data_dir: Path, *, scale: str = "small", fresh: bool = False, tie_to_parent: bool = False,
       progress: Callable[[str], None] = lambda msg: None) -> DemoStack:
    """Start the services (on free ports), create schemas, seed if not yet seeded, write atc.toml."""
    import shutil

    data_dir = data_dir.expanduser().resolve()
    if fresh and data_dir.exists():
        down(data_dir)
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = stack_for(data_dir)
    state = stack.load_state()
    if stack.postgres.is_running() or stack.s3.is_running():
        raise AtcError(f"a demo is already running in {data_dir}; stop it with `atc demo down --data-dir {data_dir}`")
    try:
        progress("starting PostgreSQL")
        stack.postgres.start(tie_to_parent=tie_to_parent)
        progress("starting SeaweedFS S3")
        stack.s3.start(tie_to_parent=tie_to_parent)
        stack.postgres.create_database(DEMO_DATABASE)
        stack.write_config()
        stack.save_state()
        settings = stack.settings()
        seeded = state.get("seeded")
        if not seeded or seeded.get("scale") != scale:
            from .schema import upgrade
            from .seed import seed_demo

            progress(f"seeding a {scale} data set")
            summary = seed_demo(settings, scale=scale, progress=progress)
            upgrade(settings)
            stack.save_state(seeded={"scale": scale, **summary})
        else:
            from .schema import upgrade

            upgrade(settings)
    except BaseException:
        stack.stop()
        raise
    return stack


def down(data_dir: Path) -> bool:
    """Stop the demo's services; True if anything was running."""
    stack = stack_for(data_dir)
    if not stack.data_dir.exists():
        raise AtcError(f"no demo data directory at {stack.data_dir} (check --data-dir)")
    was_running = stack.postgres.is_running() or stack.s3.is_running() or _weed_pid_alive(stack)
    stack.stop()
    return was_running


def _weed_pid_alive(stack: DemoStack) -> bool:
    try:
        pid = int((stack.s3.data_dir / "weed.pid").read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
