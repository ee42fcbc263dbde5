"""Config loading: defaults, the shipped file, overrides and one-line errors naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
        ("port: 70000", "port"),
        ("port: -1", "port"),
        ("port: true", "port"),
        ("upstreams: [{name: a, base_url: 'http://:80/v1'}]", "upstreams[0].base_url"),
        ("upstreams: [{name: a, base_url: 'http://x:99999/v1'}]", "upstreams[0].base_url"),
        ("bogus: 1", "bogus"),
        ("upstreams: [{name: a}]", "upstreams[0].base_url"),
        ("upstreams: [{name: a, base_url: 'ftp://x'}]", "upstreams[0].base_url"),
        ("upstreams: [{name: a, base_url: 'http://x/v1', provider: nope}]", "upstreams[0].provider"),
        ("upstreams: [{name: a, base_url: 'http://x/v1', api_key_env: MP_TEST_UNSET_VAR}]",
         "upstreams[0].api_key_env"),
        ("timeouts: {connect_s: -1}", "timeouts.connect_s"),
        ("budgets: {default: {usd: 1.0e+300}}", "budgets.default.usd"),
        ("budgets: {default: {tokens: 100000000000000000}}", "budgets.default.tokens"),
        ("fsync: sometimes", "fsync"),
        ("default_run_id: ../x", "default_run_id"),
        ("on_record_failure: drop", "on_record_failure"),
        ("budgets: {default: {usd: -1}}", "budgets.default.usd"),
        ("budgets: {default: {usd: .nan}}", "budgets.default.usd"),
        ("budgets: {runs: [{usd: 1}]}", "budgets.runs[0].match"),
        ("budgets: {runs: [{match: 'e-*', tokens: 1.5}]}", "budgets.runs[0].tokens"),
        ("budgets: {runs: [{match: 'e-*', dollars: 1}]}", "budgets.runs[0].dollars"),
        ("access: {proxy_keys: ['two words']}", "access.proxy_keys"),
        ("access: {proxy_keys_env: MP_TEST_UNSET_VAR}", "access.proxy_keys_env"),
        ("access: {admin_token_env: MP_TEST_UNSET_VAR}", "access.admin_token_env"),
    ],
)
def test_invalid_config_exits_2_naming_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str,
                                           key: str) -> None:  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}:" in err


def test_port_0_means_any_free_port() -> None:
    assert C.from_mapping({"port": 0}).port == 0
    assert C.with_overrides(C.Config(), port=0).port == 0
    with pytest.raises(C.ConfigError, match="--port: must be a port from 1 to 65535"):
        C.with_overrides(C.Config(), port=65536)


@pytest.mark.parametrize(
    "url",
    [
        "nosuch", "ftp://x/v1", "http://:80/v1", "http:///v1", "http://x:99999/v1", "http://x:abc/v1",
        "http://x:0/v1", "http://[::1/v1", "http://user:SECRET@:80/v1", "http://user:SECRET@x:99999/v1",
    ],
)  # fmt: skip
def test_bad_upstream_urls_fail_naming_the_key_and_never_show_a_password(url: str) -> None:
    with pytest.raises(C.ConfigError) as caught:
        C.with_overrides(C.Config(), upstream=url)
    message = str(caught.value)
    assert message.startswith("config: --upstream: ") and "SECRET" not in message


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1"),
        ("https://[::1]:8443/v1", "https://[::1]:8443/v1"),
        ("HTTPS://api.example.com/v1", "HTTPS://api.example.com/v1"),
    ],
)
def test_good_upstream_urls(url: str, want: str) -> None:
    assert C.normalise_base_url(url, "k") == want


def test_redact_url() -> None:
    assert C.redact_url("http://user:PASS@h:8080/v1?q=a@b") == "http://***@h:8080/v1?q=a@b"
    assert C.redact_url("https://token@h/v1") == "https://***@h/v1"
    assert C.redact_url("http://h/v1/u@x") == "http://h/v1/u@x"
    assert C.redact_url("nosuch") == "nosuch"


def test_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(C.ConfigError, match="cannot read"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1,\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load(bad)


def test_budgets_and_access_parse() -> None:
    import yaml

    cfg = C.from_mapping(yaml.safe_load(
        "budgets: {default: {usd: 20, tokens: 5000000}, runs: [{match: 'eval-*', usd: 2.5}]}\n"
        "access: {proxy_keys: [k1, k2], admin_token: adm}\n"
    ))  # fmt: skip
    assert cfg.budgets == C.Budgets(default=C.BudgetRule(usd=20, tokens=5_000_000),
                                    runs=(C.BudgetRule(match="eval-*", usd=2.5),))  # fmt: skip
    assert cfg.access == C.Access(proxy_keys=("k1", "k2"), admin_token="adm")


@pytest.mark.parametrize(("value", "seconds"), [("24h", 86400.0), ("30m", 1800.0), ("90s", 90.0), ("1d", 86400.0),
                                             ("1.5h", 5400.0), (3600, 3600.0), (None, None)])  # fmt: skip
def test_prices_refresh_parses_durations_and_is_off_by_default(value: object, seconds: float | None) -> None:
    prices = {} if value is None else {"refresh": value}
    assert C.from_mapping({"prices": prices}).prices_refresh_s == seconds
    assert C.Config().prices_refresh_s is None and C.Config().prices_refresh_url is None


@pytest.mark.parametrize(("prices", "why"), [
    ({"refresh": "soon"}, "prices.refresh: must be a duration"),
    ({"refresh": "0.5s"}, "prices.refresh: must be at least 1s"),
    ({"refresh": True}, "prices.refresh: must be a duration"),
    ({"refresh": "24h", "file": "mine.json"}, "prices.refresh: .*prices.file is set"),
    ({"refresh": "24h", "refresh_url": "ftp://x/y"}, "prices.refresh_url: must be an http"),
])  # fmt: skip
def test_bad_prices_refresh_names_the_key(prices: dict[str, object], why: str) -> None:
    with pytest.raises(C.ConfigError, match=why):
        C.from_mapping({"prices": prices})


def _config_rows() -> list[str]:
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    section = doc.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


@pytest.mark.parametrize(("section", "key"), sorted((s, k) for s, keys in C.KEYS.items() for k in keys))
def test_every_config_key_is_documented(section: str, key: str) -> None:
    """docs/config.md's config table and config/proxy.yaml name every key the parser accepts."""
    rows = _config_rows()
    if section:
        assert any(f"`{section}" in row and key in row for row in rows), (section, key)
    else:
        assert any(re.search(rf"`{re.escape(key)}(\[\])?[`.]", row.split("|")[1]) for row in rows), key
    yaml_text = (ROOT / "config" / "proxy.yaml").read_text(encoding="utf-8")
    assert re.search(rf"^[#\s-]*{re.escape(key)}:", yaml_text, re.MULTILINE), (section, key)


def test_no_documented_key_is_unknown() -> None:
    """Every top-level key in the config table is one the parser accepts (no stale docs)."""
    for row in _config_rows():
        first = row.split("|")[1]
        name = re.match(r"\s*`([a-z_]+)", first)
        assert name and name.group(1) in C.KEYS[""], row


def test_the_fleet_example_loads_and_compose_sets_every_variable_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """config/fleet.yaml is what compose.yaml runs: it must load, and compose must set each *_env it reads."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    proxy = compose["x-proxy"]
    fleet_text = (ROOT / "config" / "fleet.yaml").read_text(encoding="utf-8")
    named = set(re.findall(r"_env:\s*([A-Z_]+)", fleet_text))
    assert named and named <= set(proxy["environment"]), named - set(proxy["environment"])
    for name in named:
        monkeypatch.setenv(name, "redis://r:6379/0" if "REDIS" in name else
                           "postgresql://u:p@pg/db" if "PG" in name else "k-0123456789")  # fmt: skip
    cfg = C.load(ROOT / "config" / "fleet.yaml")
    assert cfg.budgets.store is not None and cfg.budgets.store.url == "redis://r:6379/0"
    assert cfg.ship.postgres is not None and cfg.ship.postgres.url == "postgresql://u:p@pg/db"
    assert cfg.access.proxy_keys and cfg.access.admin_token  # bound to 0.0.0.0 with an injected key
    mounted = {v.split(":")[1] for s in ("proxy-a", "proxy-b") for v in compose["services"][s]["volumes"]}
    assert proxy["command"][1] in mounted and "/runs" in mounted
    assert {"redis", "postgres"} <= set(compose["services"]) and proxy["build"]["args"]["EXTRAS"] == "fleet"
