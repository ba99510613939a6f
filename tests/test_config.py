"""Configuration: defaults, strict validation with one-line errors, file resolution."""

from __future__ import annotations

import pytest

from console.cli import main
from console.config import Settings, load_settings, settings_from_mapping
from console.errors import ConfigError


def test_defaults_are_safe():
    s = Settings()
    assert s.database.statement_timeout == "5s"
    assert s.database.lock_timeout == "1s"
    assert s.database.idle_in_transaction_session_timeout == "10s"
    assert s.read_only is False
    assert s.operator_name  # login name


def test_sample_config_parses_and_matches_defaults():
    from pathlib import Path

    sample = Path(__file__).resolve().parent.parent / "sample-config.toml"
    settings = load_settings(str(sample))
    assert settings.database == Settings().database
    assert settings.s3 == Settings().s3
    assert settings.broker == Settings().broker
    assert settings.ui == Settings().ui


def test_sample_config_documents_every_setting():
    """Every dataclass field appears as a key in sample-config.toml."""
    import tomllib
    from dataclasses import fields, is_dataclass
    from pathlib import Path

    raw = tomllib.loads((Path(__file__).resolve().parent.parent / "sample-config.toml").read_text())

    def walk(cls, table, prefix=""):
        for f in fields(cls):
            if f.name in ("source", "read_only_origin"):
                continue
            assert f.name in table, f"sample-config.toml lacks {prefix}{f.name}"
            if is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Settings")):
                sub = getattr(cls(), f.name).__class__
                walk(sub, table[f.name], prefix=f"{prefix}{f.name}.")

    walk(Settings, raw)


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"database": {"dsnn": "x"}}, "unknown key [database] 'dsnn'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"read_only": "yes"}, "read_only must be true or false"),
        ({"database": {"connect_timeout": "5"}}, "database.connect_timeout must be a whole number"),
        ({"database": {"lock_timeout": "soon"}}, "database.lock_timeout = 'soon' is not a duration"),
        ({"database": "host=x"}, "[database] must be a table"),
        ({"ui": {"page_size": -3}}, "ui.page_size must not be negative"),
    ],
)
def test_bad_settings_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        settings_from_mapping(raw, source="t.toml")
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [5, "5", 2.5])
def test_timeout_without_unit_is_refused(value):
    # PostgreSQL would read a bare number as milliseconds; `statement_timeout = 5` means 5 ms there.
    with pytest.raises(ConfigError, match="has no unit: write e.g."):
        settings_from_mapping({"database": {"statement_timeout": value}})


@pytest.mark.parametrize("value", [0, "0", "250ms", "5s", "2min", "1h"])
def test_timeouts_with_units_or_zero_are_accepted(value):
    assert settings_from_mapping({"database": {"lock_timeout": value}}).database.lock_timeout == str(value)


def test_read_only_refusal_names_its_origin(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text("read_only = false\n")
    assert main(["--config", str(path), "--read-only", "db", "upgrade"]) == 2
    assert "read_only" in capsys.readouterr().err
    from console.audit import require_writable
    from dataclasses import replace

    with pytest.raises(Exception, match=r"\(--read-only\)"):
        require_writable(replace(load_settings(str(path)), read_only=True, read_only_origin="--read-only"), "pause")
    path.write_text("read_only = true\n")
    with pytest.raises(Exception, match=f"read_only = true in {path}"):
        require_writable(load_settings(str(path)), "pause")


def test_config_resolution_env_and_explicit(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('operator = "ana"\n')
    monkeypatch.setenv("ATC_CONFIG", str(path))
    assert load_settings(None).operator == "ana"
    monkeypatch.delenv("ATC_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nothing-here"))
    assert load_settings(None) == Settings()  # a missing default file is fine
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[database\n", "is not valid TOML"),
        ('[database]\ndsnn = "x"\n', "unknown key [database] 'dsnn'"),
        ("read_only = 1\n", "read_only must be true or false"),
    ],
)
def test_cli_bad_config_is_one_line_exit_2(tmp_path, capsys, content, needle):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    code = main(["--config", str(path), "config"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("atc: ")
    assert "Traceback" not in err


def test_config_output_never_shows_passwords(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[database]\ndsn = "postgresql://atc:s3cret@db.example/cg"\nreplica_dsn = "host=r password=hunter2 dbname=cg"\n')
    assert main(["--config", str(path), "--json", "config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out and "hunter2" not in out
    assert "***" in out
