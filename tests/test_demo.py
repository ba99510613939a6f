"""The demo lifecycle, end to end: `atc demo up/down` and plain `atc demo`, run as real processes.

Checks what a newcomer and a careful operator rely on: the printed instructions and config work,
every listening socket is on 127.0.0.1, two demos never share a port, S3 insists on the generated
credentials, and no server outlives its demo, even when the `atc` process is killed mid-start,
SIGTERMed while the TUI runs, or SIGKILLed.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

ATC = [sys.executable, "-m", "console"]


def atc(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*ATC, *args], capture_output=True, text=True, timeout=timeout)


def processes_of(data_dir: Path) -> list[psutil.Process]:
    """Keeper, postmaster and weed of a data dir (each names the dir on its command line)."""
    found = []
    needle = str(data_dir)
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if needle in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until_gone(data_dir: Path, pids: list[int] = (), timeout: float = 40.0) -> list[str]:
    """Poll until nothing of the demo runs; returns what is still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [" ".join(p.info["cmdline"])[:120] for p in processes_of(data_dir)]
        left += [f"pid {pid}" for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.2)
    return left


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def state(data_dir: Path) -> dict:
    return json.loads((data_dir / "demo.json").read_text())


def server_tree(data_dir: Path) -> list[psutil.Process]:
    st = state(data_dir)
    keeper = psutil.Process(st["keeper"]["pid"])
    return [keeper, *keeper.children(recursive=True)]


def listening(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    addrs = set()
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    addrs.add((conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return addrs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo") / "one"
    result = atc("demo", "up", "--data-dir", str(data_dir), "--scale", "test")
    assert result.returncode == 0, result.stderr
    yield data_dir, result
    atc("demo", "down", "--data-dir", str(data_dir))
    assert wait_until_gone(data_dir) == []


def test_up_prints_how_to_use_it_and_writes_a_working_config(demo):
    data_dir, result = demo
    config = data_dir / "atc.toml"
    assert config.exists()
    assert f"atc --config {config}" in result.stdout
    assert f"atc demo down --data-dir {data_dir}" in result.stdout
    check = atc("--config", str(config), "db", "check", "--json")
    assert check.returncode == 0, check.stderr
    info = json.loads(check.stdout)
    assert info["database"]["database"] == "autotest" and info["s3"]["ok"] is True
    listed = atc("--config", str(config), "assignments", "--json")
    assert listed.returncode == 0, listed.stderr
    payload = json.loads(listed.stdout)
    assert payload["kind"] == "assignments" and len(payload["items"]) == 8
    # The secret key is in the credentials file only, never in the config or the output.
    secret = json.loads((data_dir / "s3" / "s3-identities.json").read_text())["identities"][0]["credentials"][0]["secretKey"]
    assert secret not in config.read_text() and secret not in result.stdout + result.stderr


def test_every_listening_socket_is_on_loopback(demo):
    data_dir, _ = demo
    st = state(data_dir)
    addrs = listening(server_tree(data_dir))
    assert ("127.0.0.1", st["postgres"]["port"]) in addrs
    assert ("127.0.0.1", st["s3"]["port"]) in addrs
    assert len(addrs) >= 5  # weed's master, volume, filer, s3 and their gRPC ports
    assert {ip for ip, _ in addrs} == {"127.0.0.1"}, addrs


def test_s3_requires_the_generated_credentials(demo):
    data_dir, _ = demo
    endpoint = state(data_dir)["s3"]["endpoint"]
    anonymous = httpx.get(f"{endpoint}/atc-logs/", timeout=10)
    assert anonymous.status_code == 403
    anonymous_put = httpx.put(f"{endpoint}/atc-logs/x.txt", content=b"x", timeout=10)
    assert anonymous_put.status_code == 403

    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    wrong = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="ATCWRONG", aws_secret_access_key="nope",
                         region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as info:
        wrong.list_objects_v2(Bucket="atc-logs")
    assert info.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied", "SignatureDoesNotMatch", "403")


def test_two_demos_use_different_ports_and_down_stops_everything(demo, tmp_path):
    first_dir, _ = demo
    second_dir = tmp_path / "two"
    up = atc("demo", "up", "--data-dir", str(second_dir), "--scale", "test", "--json")
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    assert info["seeded"]["scale"] == "test"
    tree = server_tree(second_dir)
    pids = [p.pid for p in tree]
    ports_first = {port for _, port in listening(server_tree(first_dir))}
    ports_second = {port for _, port in listening(tree)}
    assert ports_second and not (ports_first & ports_second)
    again = atc("demo", "up", "--data-dir", str(second_dir), "--scale", "test")
    assert again.returncode == 2 and "already running" in again.stderr and "Traceback" not in again.stderr
    down = atc("demo", "down", "--data-dir", str(second_dir), "--json")
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["stopped"] is True
    assert wait_until_gone(second_dir, pids, timeout=5) == []
    # Down again is harmless and says nothing was running.
    assert json.loads(atc("demo", "down", "--data-dir", str(second_dir), "--json").stdout)["stopped"] is False


def test_down_of_an_unknown_dir_is_one_line(tmp_path):
    result = atc("demo", "down", "--data-dir", str(tmp_path / "nothing-here"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no demo data directory" in result.stderr


@pytest.mark.parametrize("kill_after", ["S3 listening", "seeding a test data set"])
def test_demo_up_killed_mid_start_leaves_no_server(tmp_path, kill_after):
    data_dir = tmp_path / "killed"
    proc = subprocess.Popen([*ATC, "demo", "up", "--data-dir", str(data_dir), "--scale", "test"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if kill_after in line:
                break
        assert any(kill_after in line for line in seen), seen
        assert processes_of(data_dir), "the servers should be starting now"
        proc.kill()  # SIGKILL: no cleanup code of atc runs
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_until_gone(data_dir) == []


def test_keeper_killed_takes_its_servers_down(tmp_path):
    """The PR_SET_PDEATHSIG tie: SIGKILL of the keeper, and postgres and weed follow."""
    data_dir = tmp_path / "tie"
    assert atc("demo", "up", "--data-dir", str(data_dir), "--scale", "test").returncode == 0
    tree = server_tree(data_dir)
    os.kill(tree[0].pid, signal.SIGKILL)
    assert wait_until_gone(data_dir, [p.pid for p in tree]) == []


class PtyDemo:
    """Plain `atc demo` on a pseudo-terminal (the TUI needs one), its output drained in a thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        master, slave = pty.openpty()
        env = dict(os.environ, TERM="xterm-256color", COLUMNS="100", LINES="30")
        self.proc = subprocess.Popen([*ATC, "demo", "--data-dir", str(data_dir), "--scale", "test"],
                                     stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.master = master
        self.output = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def wait_for_tui(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The TUI switches to the alternate screen once it runs.
            if b"\x1b[?1049h" in self.output and (self.data_dir / "demo.json").exists():
                return
            assert self.proc.poll() is None, bytes(self.output[-2000:]).decode(errors="replace")
            time.sleep(0.2)
        raise AssertionError("the TUI did not start: " + bytes(self.output[-2000:]).decode(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        try:
            os.close(self.master)
        except OSError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_plain_demo_stops_everything_when_signalled(tmp_path, sig):
    data_dir = tmp_path / "plain"
    demo = PtyDemo(data_dir)
    try:
        demo.wait_for_tui()
        pids = [p.pid for p in server_tree(data_dir)]
        assert len(pids) >= 3
        demo.proc.send_signal(sig)
        demo.proc.wait(60)
        assert wait_until_gone(data_dir, pids) == []
    finally:
        demo.close()
