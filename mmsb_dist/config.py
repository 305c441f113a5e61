"""Settings of the ``mmsb-dist`` command: defaults < config file < environment < flags.

The defaults are ``configs/default.yaml`` (shipped as ``mmsb_dist/configs/default.yaml``), which
documents every key. ``load()`` merges the layers, checks every key and value against that file's
keys and the rules below, and raises ``ConfigError`` with one line naming the key, where its value
came from (file, MMSB_* variable or flag) and what to do about it. Checks that need the outside
world (a reachable address, a writable data directory, enough resources) are separate functions,
called by the commands that need them.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import yaml

from mmsb_dist.errors import MmsbError

DEFAULT_PATH = Path(__file__).resolve().parent / "configs" / "default.yaml"
ENV_PREFIX = "MMSB_"

# A shard is an actor with its own log and arena: thousands are already far more than any
# cluster here would run; this only catches typos (shards: 10000000).
SHARDS_MAX = 4096

# Seconds to wait for a TCP connection to the cluster's head before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0

_CHOICES = {"backend": ("auto", "numpy", "cupy"), "fsync": ("always", "interval", "none")}
_NULLABLE = {"address", "ray.num_cpus", "ray.object_store_memory_bytes", "gateway.token",
             "checkpoint_uri"}
_NULLABLE_TYPES = {"address": str, "ray.num_cpus": int, "ray.object_store_memory_bytes": int,
                   "gateway.token": str, "checkpoint_uri": str}
_POSITIVE = {"shards", "prepare_timeout_s", "gpus_per_shard", "ray.num_cpus",
             "ray.object_store_memory_bytes", "gateway.max_body_bytes",
             "gateway.max_batch_deltas"}
_NON_NEGATIVE = {"auto_commit_s", "gateway.rate_per_s", "gateway.rate_burst"}
_PORTS = {"ray.port", "ray.dashboard_port", "ray.metrics_export_port", "ray.client_server_port",
          "gateway.port"}


class ConfigError(MmsbError, ValueError):
    """A setting is unknown, of the wrong type or impossible; the message names the key, where the
    value came from and what to change."""


def defaults() -> dict:
    with open(DEFAULT_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _read_file(path: str) -> dict:
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror}): pass an existing "
                          "YAML file to --config / MMSB_CONFIG") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}: not valid YAML{where}: fix the syntax") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: must be a mapping of settings (key: value), "
                          f"got a {type(tree).__name__}")
    return tree


def _check_known(flat: dict, known: dict, source: str) -> None:
    sections = {k.split(".")[0] for k in known if "." in k}
    for key, value in flat.items():
        if key in known:
            continue
        head = key.split(".")[0]
        if head in sections and "." not in key:
            raise ConfigError(f"{source}: '{key}' is a section, not a value: give it keys "
                              f"({', '.join(k for k in known if k.startswith(head + '.'))})")
        if head in sections:
            choices = ", ".join(k.split(".", 1)[1] for k in known if k.startswith(head + "."))
            raise ConfigError(f"{source}: unknown key '{key}' (keys under '{head}': {choices})")
        raise ConfigError(f"{source}: unknown key '{key}' (known keys: "
                          f"{', '.join(k for k in known if '.' not in k)}, and the sections "
                          f"{', '.join(sorted(sections))})")


def _env_layer(known: dict, environ) -> tuple[dict, dict]:
    """MMSB_<PATH> variables of known keys (other MMSB_* variables belong to other tools)."""
    values, sources = {}, {}
    for key in known:
        name = ENV_PREFIX + key.replace(".", "_").upper()
        if name in environ:
            raw = environ[name]
            try:
                values[key] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError:
                values[key] = raw
            sources[key] = f"environment variable {name}"
    return values, sources


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


def _check_value(key: str, value, default, source: str):
    """The value, converted where harmless (an integer where a number goes); ConfigError else."""
    where = f"'{key}' (from {source})"
    if value is None:
        if key in _NULLABLE:
            return None
        raise ConfigError(f"{where} must be set: give it a value (see configs/default.yaml)")
    expected = _NULLABLE_TYPES.get(key) or type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"{where} must be {_type_name(expected)}, got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{where} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key in _POSITIVE and value <= 0:
        raise ConfigError(f"{where} must be greater than 0, got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        raise ConfigError(f"{where} must be 0 or more, got {value!r}")
    if key in _PORTS and not 1 <= value <= 65535:
        raise ConfigError(f"{where} must be a TCP port (1-65535), got {value!r}")
    if key == "shards" and value > SHARDS_MAX:
        raise ConfigError(f"{where}: {value} shards is more than config.SHARDS_MAX={SHARDS_MAX}: "
                          "use fewer, larger shards")
    if key in ("data_dir", "state_dir", "ray.temp_dir", "namespace") and not value.strip():
        raise ConfigError(f"{where} must not be empty")
    return value


def load(path: str | None = None, flags: dict | None = None, environ=None) -> dict:
    """Settings as a nested dict: defaults, then the file at ``path`` (or $MMSB_CONFIG), then
    MMSB_* variables, then ``flags`` (dotted keys; None means "not given")."""
    environ = os.environ if environ is None else environ
    base = _flatten(defaults())
    merged = dict(base)
    sources = {k: "configs/default.yaml" for k in base}
    path = path or environ.get("MMSB_CONFIG") or None
    if path:
        flat = _flatten(_read_file(path))
        _check_known(flat, base, f"config file {path}")
        merged.update(flat)
        sources.update({k: f"config file {path}" for k in flat})
    env_values, env_sources = _env_layer(base, environ)
    merged.update(env_values)
    sources.update(env_sources)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    _check_known(given, base, "command line")
    merged.update(given)
    sources.update({k: f"flag --{k.split('.')[-1].replace('_', '-')}" for k in given})
    checked = {k: _check_value(k, merged[k], base[k], sources[k]) for k in base}
    checked["data_dir"] = os.path.abspath(os.path.expanduser(checked["data_dir"]))
    checked["state_dir"] = os.path.abspath(os.path.expanduser(checked["state_dir"]))
    checked["ray.temp_dir"] = os.path.abspath(os.path.expanduser(checked["ray.temp_dir"]))
    if len(checked["ray.temp_dir"]) > 40:
        raise ConfigError(f"'ray.temp_dir' (from {sources['ray.temp_dir']}) is "
                          f"{len(checked['ray.temp_dir'])} characters: Ray's socket paths under it "
                          "must stay under 107 bytes; use a path of at most 40 characters")
    cfg = _unflatten(checked)
    cfg["_sources"] = sources
    return cfg


def runtime_config(cfg: dict) -> dict:
    """The ``config`` argument of ``mmsb_dist.start`` from the settings."""
    return {k: cfg[k] for k in ("backend", "fsync", "prepare_timeout_s", "auto_commit_s",
                                "gpus_per_shard", "checkpoint_uri")}


# ---- checks against the outside world --------------------------------------------------------------

def check_data_dir(cfg: dict) -> str:
    """Create the data directory if needed and prove it writable (a file written and removed)."""
    path = cfg["data_dir"]
    source = cfg["_sources"]["data_dir"]
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mmsb-write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"data_dir {path} (from {source}) is not writable ({exc.strerror}): "
                          "pick a directory you can write, or fix its permissions") from None
    return path


def parse_address(address: str, source: str) -> tuple[str, int] | None:
    """(host, port) to probe for ``address``; None for "auto" (found by Ray on this machine)."""
    if address == "auto":
        return None
    url = urlparse(address if "://" in address else f"gcs://{address}")
    if url.scheme not in ("gcs", "ray"):
        raise ConfigError(f"address {address!r} (from {source}): give HOST:PORT of the head's GCS "
                          "(e.g. 10.0.0.1:6379), ray://HOST:PORT, or auto")
    try:
        port = url.port
    except ValueError:
        port = None
    if not url.hostname or port is None:
        raise ConfigError(f"address {address!r} (from {source}): give HOST:PORT, e.g. "
                          "10.0.0.1:6379")
    return url.hostname, port


def check_address(cfg: dict) -> None:
    """Refuse an address nothing answers at, in seconds rather than after Ray's long retries."""
    address, source = cfg["address"], cfg["_sources"]["address"]
    target = parse_address(address, source)
    if target is None:
        if not (os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists()):
            raise ConfigError(f"address 'auto' (from {source}): no Ray cluster is running on this "
                              "machine: start one (mmsb-dist start without an address), or give "
                              "the head's HOST:PORT")
        return
    host, port = target
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(f"address {address} (from {source}) is unreachable "
                          f"({exc.strerror or exc}): check the head is up and the host and port "
                          "are right") from None


def check_resources(cfg: dict, cluster: dict) -> None:
    """Refuse a shard count the cluster cannot place (the shards would wait for ever)."""
    shards, backend = cfg["shards"], cfg["backend"]
    gpus = cluster.get("GPU", 0)
    use_gpu = backend == "cupy" or (backend == "auto" and gpus >= 1)
    if use_gpu:
        need = shards * cfg["gpus_per_shard"]
        if need > gpus + 1e-9:
            raise ConfigError(f"shards={shards} with gpus_per_shard={cfg['gpus_per_shard']:g} need "
                              f"{need:g} GPUs but the cluster has {gpus:g}: lower shards or "
                              "gpus_per_shard, or add GPU nodes")
        return
    cpus = cluster.get("CPU", 0)
    if shards > cpus:
        raise ConfigError(f"shards={shards} need {shards} CPUs (one per NumPy shard) but the "
                          f"cluster has {cpus:g}: lower shards, raise ray.num_cpus, or add nodes")
