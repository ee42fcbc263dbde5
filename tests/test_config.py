"""Config loading: defaults, the shipped file, overrides and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import config as C
from proxy.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_file_equals_defaults() -> None:
    assert C.load(ROOT / "config" / "proxy.yaml") == C.Config()


def test_overrides() -> None:
    cfg = C.with_overrides(C.Config(), host="0.0.0.0", port=9000, upstream="http://127.0.0.1:11434/v1/",
                           runs_dir="/tmp/r")  # fmt: skip
    assert (cfg.host, cfg.port, str(cfg.runs_dir)) == ("0.0.0.0", 9000, "/tmp/r")
    assert cfg.upstreams == (C.Upstream(name="default", base_url="http://127.0.0.1:11434/v1"),)


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("port: eighty", "port"),
        ("bogus: 1", "bogus"),
        ("upstreams: [{name: a}]", "upstreams[0].base_url"),
        ("upstreams: [{name: a, base_url: 'ftp://x'}]", "upstreams[0].base_url"),
        ("upstreams: [{name: a, base_url: 'http://x/v1', provider: nope}]", "upstreams[0].provider"),
        ("upstreams: [{name: a, base_url: 'http://x/v1', api_key_env: MP_TEST_UNSET_VAR}]",
         "upstreams[0].api_key_env"),
        ("timeouts: {connect_s: -1}", "timeouts.connect_s"),
        ("fsync: sometimes", "fsync"),
        ("default_run_id: ../x", "default_run_id"),
        ("on_record_failure: drop", "on_record_failure"),
    ],
)
def test_invalid_config_exits_2_naming_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str,
                                           key: str) -> None:  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}:" in err


def test_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1,\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)
