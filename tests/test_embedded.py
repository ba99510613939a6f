"""Embedded services start wherever their data dir is, however deep (Unix socket paths are
limited to 107 bytes, and pytest's numbered temp dirs grow past that on a long-lived machine)."""

from __future__ import annotations

import psycopg

from console.embedded import EmbeddedPostgres, EmbeddedS3


def test_services_start_under_a_very_deep_data_dir(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep)) > 120
    pg = EmbeddedPostgres(deep / "postgres")
    s3 = EmbeddedS3(deep / "s3")
    try:
        pg.start(tie_to_parent=True)
        with psycopg.connect(pg.dsn(), connect_timeout=5) as conn:
            assert conn.execute("SELECT current_setting('listen_addresses')").fetchone()[0] == "127.0.0.1"
        s3.start(tie_to_parent=True)
        assert s3.endpoint_url.startswith("http://127.0.0.1:")
    finally:
        s3.stop()
        pg.stop()
    assert not pg.is_running()
    assert not s3.socket_dir.exists()
