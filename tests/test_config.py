"""Settings: defaults from configs/default.yaml, then a config file, the environment and flags;
every key checked, with one line naming the key, its source and the fix."""

from pathlib import Path

import pytest
import yaml

from mmsb_dist import config
from mmsb_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_package_loads_the_documented_defaults_file():
    shipped = config.DEFAULT_PATH.read_text()
    assert shipped == (ROOT / "configs" / "default.yaml").read_text()
    cfg = config.load(environ={})
    assert cfg["shards"] == 1 and cfg["address"] is None and cfg["gateway"]["enabled"] is False


def test_every_key_is_documented_by_a_comment():
    lines = (ROOT / "configs" / "default.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            above = lines[i - 1].strip()
            assert above.startswith("#") or line.rstrip().endswith(":"), \
                f"line {i + 1} ({line.strip()}) has no comment above it"


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"shards": 2, "fsync": "interval", "ray": {"port": 7000}}))
    env = {"MMSB_SHARDS": "3", "MMSB_RAY_DASHBOARD_PORT": "9000", "MMSB_SEED": "7"}
    cfg = config.load(str(f), {"shards": 4, "backend": None}, environ=env)
    assert cfg["shards"] == 4                       # flag over env over file
    assert cfg["fsync"] == "interval"               # file over defaults
    assert cfg["ray"]["port"] == 7000 and cfg["ray"]["dashboard_port"] == 9000
    assert cfg["backend"] == "auto"                 # a flag left out changes nothing
    assert config.load(str(f), environ=env)["shards"] == 3
    assert config.load(environ={"MMSB_CONFIG": str(f)})["shards"] == 2


@pytest.mark.parametrize("text, words", [
    ("shardz: 2", ["unknown key 'shardz'"]),
    ("ray:\n  prot: 1", ["unknown key 'ray.prot'", "port"]),
    ("shards: two", ["'shards'", "an integer", "'two'"]),
    ("shards: true", ["'shards'", "an integer"]),
    ("shards: 0", ["'shards'", "greater than 0"]),
    ("shards: 100000", ["SHARDS_MAX"]),
    ("backend: tpu", ["'backend'", "auto, numpy, cupy"]),
    ("gateway:\n  port: 70000", ["'gateway.port'", "1-65535"]),
    ("gateway: 3", ["'gateway' is a section"]),
    ("auto_commit_s: -1", ["'auto_commit_s'", "0 or more"]),
    ("[1, 2]", ["must be a mapping"]),
    ("shards: [", ["not valid YAML"]),
])
def test_bad_files_name_the_key_and_the_file(tmp_path, text, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(str(f), environ={})
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message
    assert "bad.yaml" in message


def test_bad_environment_names_the_variable():
    with pytest.raises(ConfigError, match="MMSB_FSYNC"):
        config.load(environ={"MMSB_FSYNC": "sometimes"})


def test_numbers_accept_integers_and_nullable_keys_accept_null(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prepare_timeout_s: 5\nray:\n  num_cpus: null\ngateway:\n  token: s3cret\n")
    cfg = config.load(str(f), environ={})
    assert cfg["prepare_timeout_s"] == 5.0 and isinstance(cfg["prepare_timeout_s"], float)
    assert cfg["ray"]["num_cpus"] is None and cfg["gateway"]["token"] == "s3cret"


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load(str(tmp_path / "none.yaml"), environ={})


def test_outside_world_checks(tmp_path):
    cfg = config.load(environ={}, flags={"data_dir": str(tmp_path / "d")})
    assert config.check_data_dir(cfg) == str(tmp_path / "d")
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        config.check_data_dir(config.load(environ={}, flags={"data_dir": str(tmp_path / "f" / "d")}))
    with pytest.raises(ConfigError, match="unreachable"):
        config.check_address(config.load(environ={}, flags={"address": "127.0.0.1:9"}))
    with pytest.raises(ConfigError, match="HOST:PORT"):
        config.check_address(config.load(environ={}, flags={"address": "http://x:1"}))
    cfg = config.load(environ={}, flags={"shards": 8})
    with pytest.raises(ConfigError, match="shards=8 need 8 CPUs"):
        config.check_resources(cfg, {"CPU": 2.0})
    config.check_resources(cfg, {"CPU": 8.0})
    with pytest.raises(ConfigError, match="GPUs"):
        config.check_resources(config.load(environ={}, flags={"shards": 8, "backend": "cupy"}),
                               {"CPU": 64.0, "GPU": 4.0})
