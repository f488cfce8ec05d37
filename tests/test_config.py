"""Config: every problem reported with its YAML path, exit 2; expansion; fuzzed YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, Layout
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.cli import main
from daemon.config import ENGINE_MODELS, format_loc, load_config, parse_duration, parse_size
from daemon.config.example import render_example, uncommented
from daemon.engines import ENGINE_CLASSES, ENGINE_TYPES
from daemon.errors import ConfigError


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def _write(layout: Layout, config: dict[str, Any]) -> Path:
    layout.config_path.write_text(yaml.safe_dump(config))
    return layout.config_path


def test_quickstart_and_example_configs_are_valid(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "var" / "inbox").mkdir(parents=True)
    assert load_config(ROOT / "config" / "quickstart.yaml").watches[0].name == "inbox"
    example = yaml.safe_load((ROOT / "config" / "example.yaml").read_text())
    example["watches"][0]["source"] = str(tmp_path / "var" / "inbox")
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(example))
    (tmp_path / "credentials").mkdir()  # as systemd's LoadCredential= provides them
    (tmp_path / "credentials" / "alert_webhook_url").write_text("https://hooks.example/t\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    monkeypatch.setenv("BLAZELOCK_API_KEY", "example-key")
    config = load_config(tmp_path / "example.yaml")
    assert config.metrics is not None and config.engines["default"].max_pending_age == 86400
    assert config.notify is not None
    assert config.notify.webhook.get_secret_value() == "https://hooks.example/t"


def test_dropfolder_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config" / "dropfolder.yaml").read_text())
    config["watches"][0]["source"] = str(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert "*.filepart" in load_config(tmp_path / "c.yaml").watches[0].ignore


def test_defaults_of_the_outside_contract(layout: Layout) -> None:
    """Every key the contract gives a default for, left out (docs/contract.md, "Configuration")."""
    path = _write(layout, {
        "engines": {"default": {"type": "yara"}, "blz": {"type": "blazelock", "url": "http://127.0.0.1:1",
                                                           "api_key": "k"}},
        "watches": [{"name": "inbox", "source": str(layout.inbox), "engine": "default",
                     "clean": "/srv/c", "quarantine": "/srv/q", "failed": "/srv/f"},
                    {"name": "bucket", "source": "s3://drop/in/", "engine": "blz",
                     "clean": "in_place", "quarantine": "s3://quar/in/", "failed": "s3://fail/in/"}]})
    config = load_config(path)
    assert config.state_dir == Path("/var/lib/scanwatch")
    assert (config.log.format, config.log.level) == ("json", "info")
    assert config.metrics is None and config.notify is None and config.shutdown_timeout == 10
    local, s3 = config.watches
    assert local.settle_seconds == 2 and s3.poll_interval == 30 and s3.events is None
    assert local.ignore == (".*", "*.part", "*.tmp", "*.crdownload", "*.swp")
    blazelock = config.engines["blz"]
    assert blazelock.reuse_max_age == 86400 and blazelock.mode == "async"  # type: ignore[union-attr]
    assert all(engine.cache.enabled for engine in config.engines.values())
    assert config.journal.keep == 90 * 86400


def test_unknown_key_names_its_path(layout: Layout) -> None:
    config = layout.config(watch={"colour": "blue"})
    assert _problems(_write(layout, config)) == ["watches[0].colour: unknown key"]


def test_journal_keep_is_a_positive_duration_or_null(layout: Layout) -> None:
    assert load_config(_write(layout, layout.config(journal={"keep": None}))).journal.keep is None
    assert load_config(_write(layout, layout.config(journal={"keep": "30d"}))).journal.keep == 30 * 86400
    [problem] = _problems(_write(layout, layout.config(journal={"keep": 0})))
    assert problem.startswith("journal.keep: ")
    assert _problems(_write(layout, layout.config(journal={"keep": "soon"}))) == [
        "journal.keep: expected a duration such as 30, 30s, 5m, 2h or 1d"]


def test_a_clamd_address_that_is_not_host_port_names_its_own_key(layout: Layout) -> None:
    config = layout.config(engine={"type": "clamav", "address": "no-port"})
    assert _problems(_write(layout, config)) == [
        "engines.default.address: expected host:port, e.g. 127.0.0.1:9477"]


def test_missing_engine_names_the_watch(layout: Layout) -> None:
    problems = _problems(_write(layout, layout.config(watch={"engine": "nope"})))
    assert problems == ["watches[0].engine: no engine named 'nope' (defined: default)"]


@pytest.mark.parametrize("dest", ["clean", "quarantine", "failed"])
def test_destination_inside_source_is_an_error(layout: Layout, dest: str) -> None:
    config = layout.config(watch={dest: str(layout.inbox / "out")})
    [problem] = _problems(_write(layout, config))
    assert problem.startswith(f"watches[0].source: overlaps its own {dest} destination")


def test_source_inside_destination_is_an_error(layout: Layout) -> None:
    config = layout.config(watch={"clean": str(layout.base)})
    assert _problems(_write(layout, config))[0].startswith("watches[0].source: overlaps")


def test_two_watches_on_one_source(layout: Layout) -> None:
    config = layout.config()
    second = {**config["watches"][0], "name": "second", "source": str(layout.inbox) + "/"}
    config["watches"].append(second)
    assert _problems(_write(layout, config)) == [
        f"watches[1].source: overlaps watches[0].source ({layout.inbox}); "
        "each file must belong to one watch"]


def test_missing_source_directory(layout: Layout) -> None:
    config = layout.config(watch={"source": str(layout.base / "nowhere")})
    assert _problems(_write(layout, config)) == [
        f"watches[0].source: directory {layout.base / 'nowhere'} does not exist"]


def test_unknown_engine_type_names_the_available_ones(layout: Layout) -> None:
    config = layout.config()
    config["engines"]["vt"] = {"type": "virustotal", "url": "http://127.0.0.1:8008"}
    assert _problems(_write(layout, config)) == [
        "engines.vt.type: unknown engine type 'virustotal' "
        "(available: yara, clamav, blazelock, perception_point, metadefender)"]


def test_every_problem_is_reported_at_once(layout: Layout) -> None:
    config = layout.config(watch={"settle_seconds": "soon", "quarantine": "s3://q/x/"},
                           engine={"concurrency": 0})
    problems = _problems(_write(layout, config))
    assert sorted(p.split(":")[0] for p in problems) == [
        "engines.default.concurrency", "watches[0].quarantine", "watches[0].settle_seconds"]


def test_env_and_file_references_are_expanded(layout: Layout, tmp_path: Path, monkeypatch) -> None:
    secret_dir = tmp_path / "creds"
    secret_dir.mkdir()
    (secret_dir / "pwd").write_text("s3cr3t\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secret_dir))
    monkeypatch.setenv("INBOX", str(layout.inbox))
    config = layout.config(watch={"source": "${INBOX}",
                                  "archivepwd": "${file:${CREDENTIALS_DIRECTORY}/pwd}"})
    loaded = load_config(_write(layout, config))
    assert loaded.watches[0].source == str(layout.inbox)
    assert loaded.watches[0].archivepwd is not None
    assert loaded.watches[0].archivepwd.get_secret_value() == "s3cr3t"
    assert "s3cr3t" not in repr(loaded)


def test_missing_env_var_names_its_path_and_not_its_value(layout: Layout) -> None:
    config = layout.config(watch={"archivepwd": "${NOT_SET_ANYWHERE}"})
    assert _problems(_write(layout, config)) == [
        "watches[0].archivepwd: environment variable NOT_SET_ANYWHERE is not set"]


@pytest.mark.parametrize(("text", "seconds"), [(30, 30), ("30s", 30), ("5m", 300), ("2h", 7200),
                                               ("1d", 86400), ("1.5", 1.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [(10, 10), ("10MB", 10_000_000),
                                            ("10MiB", 10 * 2**20), ("1kb", 1000)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_check_config_exits_2_with_one_line_per_problem(layout: Layout) -> None:
    config = layout.config(watch={"engine": "nope", "colour": 1})
    path = _write(layout, config)
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", "--config", str(path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"scanwatch: {path} is not valid:"
    assert lines[1:] == ["watches[0].colour: unknown key"]
    assert "Traceback" not in result.stderr


def test_check_config_prints_the_plan(layout: Layout, capsys) -> None:
    assert main(["check-config", "--config", str(layout.write_config()), "--probe"]) == 0
    out = capsys.readouterr().out
    assert f"watch inbox: {layout.inbox} -> engine default" in out
    assert "probe default: ok (yara" in out


def test_run_with_a_bad_config_exits_2(layout: Layout) -> None:
    path = _write(layout, layout.config(watch={"source": str(layout.base / "missing")}))
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "run", "--config", str(path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "watches[0].source" in result.stderr


def test_bad_yara_rules_are_a_config_error(layout: Layout, tmp_path: Path, capsys) -> None:
    rules = tmp_path / "bad.yar"
    rules.write_text("rule broken {")
    assert main(["check-config", "--config", str(layout.write_config(engine={"rules": [str(rules)]}))]) == 2
    assert "engines.default.rules" in capsys.readouterr().err


def test_config_search_order(layout: Layout, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SCANWATCH_CONFIG", str(layout.write_config()))
    assert main(["check-config"]) == 0
    monkeypatch.delenv("SCANWATCH_CONFIG")
    assert main(["check-config"]) == 2
    assert "/etc/scanwatch/scanwatch.yaml" in capsys.readouterr().err


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=200), yaml_values.map(yaml.safe_dump)))
def test_fuzzed_yaml_gives_config_errors_never_tracebacks(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@pytest.mark.parametrize(("watch", "expected"), [
    ({"source": "s3://in-bucket/new/", "clean": "s3://in-bucket/new/clean/"},
     "watches[0].source: overlaps its own clean destination s3://in-bucket/new/clean/"),
    ({"source": "s3://in-bucket/new", "quarantine": "s3://in-bucket/"},
     "watches[0].source: overlaps its own quarantine destination s3://in-bucket/"),
    ({"source": "s3://IN_bucket/x/"}, "watches[0].source: 'IN_bucket' is not a valid S3 bucket name"),
    ({"clean": "s3://ok-bucket//x/"}, "watches[0].clean: the key prefix has an empty segment"),
    ({"events": {"sqs_queue_url": "https://sqs.x/1/q"}},
     "watches[0]: events: only an s3:// source has S3 event notifications"),
    ({"s3": {"region": "eu-west-1"}}, "watches[0]: s3: this watch has no s3:// location"),
    ({"fleet": True}, "watches[0]: fleet: only an s3:// source can be shared by several daemons"),
    ({"source": "s3://in-bucket/new/", "fleet": True}, "watches[0]: fleet: needs events:"),
    ({"clean": "s3://ok-bucket/x/", "s3": {"profile": "nobody"}},
     "watches[0].s3.profile: no profile 'nobody' in the AWS config files"),
])
def test_s3_locations_are_checked(layout: Layout, watch: dict[str, Any], expected: str) -> None:
    problems = _problems(_write(layout, layout.config(watch=watch)))
    assert any(p.startswith(expected) for p in problems), problems


def test_s3_source_needs_no_local_directory_and_prefixes_end_with_a_slash(layout: Layout) -> None:
    config = load_config(_write(layout, layout.config(watch={
        "source": "s3://in-bucket/new", "clean": "s3://out-bucket", "events": {"sqs_queue_url": "q"}})))
    watch = config.watches[0]
    assert (watch.source, watch.clean) == ("s3://in-bucket/new/", "s3://out-bucket/")


def test_a_fleet_watch_loads_and_fleet_is_off_by_default(layout: Layout) -> None:
    watch = {"source": "s3://in-bucket/new", "clean": "s3://out-bucket", "events": {"sqs_queue_url": "q"}}
    assert not load_config(_write(layout, layout.config(watch=watch))).watches[0].fleet
    assert load_config(_write(layout, layout.config(watch={**watch, "fleet": True}))).watches[0].fleet


def test_a_watch_s3_block_replaces_only_the_keys_it_gives(layout: Layout, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    aws_config = tmp_path / "aws-config"
    aws_config.write_text("[profile drop]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(aws_config))
    raw = layout.config(watch={"clean": "s3://out-bucket/", "s3": {"endpoint_url": "http://10.0.0.1:8333",
                                                                   "profile": "drop"}},
                        s3={"region": "us-east-1", "multipart_chunksize": "16MiB"})
    (tmp_path / "other").mkdir()
    raw["watches"].append({**raw["watches"][0], "name": "other", "source": str(tmp_path / "other"),
                           "s3": None})
    config = load_config(_write(layout, raw))
    own, other = (config.s3_for(w) for w in config.watches)
    assert (own.endpoint_url, own.profile, own.region, own.multipart_chunksize) == (
        "http://10.0.0.1:8333", "drop", "us-east-1", 16 * 2**20)
    assert other == config.s3


@pytest.mark.parametrize(("receiver", "metrics", "clash"), [
    ("127.0.0.1:9480", "127.0.0.1:9480", True),
    ("0.0.0.0:9480", "127.0.0.1:9480", True),
    ("127.0.0.1:9480", "[::]:9480", True),
    ("127.0.0.1:9480", "127.0.0.1:9477", False),
    ("127.0.0.1:9480", "127.0.0.2:9480", False),
])
def test_a_webhook_receiver_may_not_take_the_metrics_address(layout: Layout, receiver: str, metrics: str,
                                                             clash: bool) -> None:
    config = layout.config(engine={"type": "blazelock", "url": "http://127.0.0.1:9", "api_key": "k",
                                   "webhook": {"listen": receiver, "secret": "s"}},
                           metrics={"listen": metrics})
    path = _write(layout, config)
    if clash:
        assert _problems(path) == [f"engines.default.webhook.listen: {receiver} is taken by metrics.listen "
                                   f"({metrics}); give each its own port"]
    else:
        assert load_config(path).metrics is not None


def test_committed_example_yaml_is_generated_from_the_models() -> None:
    committed = (ROOT / "config" / "example.yaml").read_text()
    assert committed == render_example(), (
        "config/example.yaml is stale: run `python -m daemon.config.example > config/example.yaml`")


def test_generated_example_passes_check_config(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "credentials").mkdir()
    (tmp_path / "credentials" / "alert_webhook_url").write_text("https://hooks.example/t\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "credentials"))
    monkeypatch.setenv("BLAZELOCK_API_KEY", "example-key")
    text = render_example().replace("/srv/scanwatch/drop/invoices", str(tmp_path / "inbox"))
    (tmp_path / "example.yaml").write_text(text)
    assert main(["check-config", "--config", str(tmp_path / "example.yaml")]) == 0
    out = capsys.readouterr().out
    for line in ("engine default: yara", "engine blz: blazelock", "engine clam: clamav",
                 f"watch invoices: {tmp_path / 'inbox'} -> engine default"):
        assert line in out


def test_example_shows_one_engine_of_each_type() -> None:
    example = render_example()
    for name in ("pp", "md"):
        example = uncommented(example, name)
    types = sorted(engine["type"] for engine in yaml.safe_load(example)["engines"].values())
    assert types == sorted(ENGINE_MODELS)


def test_every_engine_model_has_an_engine_class_and_back() -> None:
    assert set(ENGINE_CLASSES) == set(ENGINE_MODELS.values())
    assert list(ENGINE_TYPES) == list(ENGINE_MODELS)


@pytest.mark.parametrize("key", ["engines.default.url", "engines.default.webhook.public_url",
                                 "notify.webhook"])
def test_every_http_url_key_rejects_other_schemes(layout: Layout, key: str) -> None:
    config = layout.config(engine={"type": "blazelock", "url": "https://blz.example", "api_key": "k",
                                   "webhook": {"listen": "127.0.0.1:9480", "secret": "s"}})
    config["notify"] = {"webhook": "https://hooks.example/t"}
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = "ftp://files.example/"
    assert _problems(_write(layout, config)) == [f"{key}: expected an http:// or https:// URL"]


@pytest.mark.parametrize("engine", ["perception_point", "metadefender"])
def test_the_other_engines_urls_are_checked_alike(layout: Layout, engine: str) -> None:
    secret = {"perception_point": {"token": "t"}, "metadefender": {}}[engine]
    config = layout.config(engine={"type": engine, "url": "file:///etc/passwd", **secret})
    assert _problems(_write(layout, config)) == ["engines.default.url: expected an http:// or https:// URL"]


@pytest.mark.parametrize(("loc", "path"), [
    (("watches", 1, "quarantine"), "watches[1].quarantine"),
    (("engines", "clam", "clamav", "socket"), "engines.clam.socket"),
    (("engines", "pp", "perception_point", "callback", "listen"), "engines.pp.callback.listen"),
    ((), "(top level)"),
])
def test_pydantic_locations_become_yaml_paths(loc: tuple[int | str, ...], path: str) -> None:
    assert format_loc(loc) == path


def test_loading_the_config_does_not_load_boto3() -> None:
    """S3 locations are parsed without boto3: config parsing stays light (docs/architecture.md)."""
    code = ("import sys, daemon.config; "
            "sys.exit(1 if {'boto3', 'botocore'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
