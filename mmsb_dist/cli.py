"""The ``mmsb-dist`` command: start, operate and stop the runtime on Ray.

- ``start``: a local Ray head (``ray start --head``: it outlives the command; dashboard and job
  server on, Prometheus metrics exported) or the cluster at ``--address``; then the coordinator
  and the shard actors (and the HTTP gateway with ``--gateway``). What it started is recorded in
  ``<state_dir>/<namespace>.json`` so that the other commands find the runtime without flags.
- ``status``: shards (node, backend, pages, bytes, epochs, log, checkpoints, replay lag, the
  metrics' totals) and the committed epochs, as a table (``--json`` for scripts).
- ``commit``, ``checkpoint``, ``replay EPOCH``, ``restore EPOCH``: the runtime's epoch operations.
- ``stop``: the gateway, the actors (their data stays), and the local Ray head if ``start``
  started it (only that head: never other Ray instances on the machine).
- ``bench SUITE``: ``benchmarks/bench_<SUITE>.py`` of a source checkout.
- ``demo``: the README's main job (mmsb_dist/demo.py).

Settings come from configs/default.yaml < ``--config`` file < MMSB_* environment < flags
(mmsb_dist/config.py). Every failure a user can fix ends with one line naming it and exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click

from mmsb_dist import __version__
from mmsb_dist import config as cfgmod
from mmsb_dist.errors import MmsbError

# Ray reads RAY_AUTH_MODE once, when it is first imported: set before any `import ray` here.
_AUTH_ENV = "RAY_AUTH_MODE"


@contextlib.contextmanager
def _clean_errors():
    """What a user can act on becomes one line and exit 1 (no traceback)."""
    try:
        yield
    except click.ClickException:
        raise
    except (MmsbError, ConnectionError, TimeoutError) as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:
        try:
            import ray
        except ImportError:
            raise exc from None
        if isinstance(exc, ray.exceptions.RayError):
            cause = getattr(exc, "cause", None)
            text = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            raise click.ClickException(text.strip().splitlines()[-1]) from None
        raise


def _remember(ctx, param, value):
    if value is not None:
        ctx.find_root().obj[param.name] = value
    return value


def common(f):
    """--config, --namespace and --address on every command too (``mmsb-dist start --address X``
    and ``mmsb-dist --address X start`` mean the same)."""
    for name, text in (("address", "Ray cluster: HOST:PORT of its head, or auto."),
                       ("namespace", "Ray namespace of the runtime (default: mmsb)."),
                       ("config", "YAML settings over configs/default.yaml (also: MMSB_CONFIG).")):
        f = click.option(f"--{name}", name, default=None, expose_value=False,
                         callback=_remember, help=text)(f)
    return f


def _settings(ctx, **flags) -> dict:
    obj = ctx.find_root().obj
    return cfgmod.load(obj["config"], {"namespace": obj["namespace"], "address": obj["address"],
                                       **flags})


# ---- what start recorded -------------------------------------------------------------------------

def _state_path(cfg: dict) -> Path:
    return Path(cfg["state_dir"]) / f"{cfg['namespace']}.json"


def _read_state(cfg: dict) -> dict:
    try:
        return json.loads(_state_path(cfg).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise cfgmod.ConfigError(f"state file {_state_path(cfg)} is unreadable ({exc}): remove it "
                                 "and run mmsb-dist start again") from None


def _write_state(cfg: dict, state: dict) -> None:
    path = _state_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        raise cfgmod.ConfigError(f"state_dir {path.parent} is not writable ({exc.strerror}): set "
                                 "state_dir (MMSB_STATE_DIR) to a writable directory") from None


def _apply_ray_env(state: dict) -> None:
    for key, value in (state.get("ray_env") or {}).items():
        os.environ.setdefault(key, value)


def _connect(cfg: dict):
    """A Bus on the runtime of ``cfg``'s namespace: at --address / MMSB_ADDRESS, else where
    ``start`` recorded it."""
    state = _read_state(cfg)
    address = cfg["address"] or state.get("address")
    if address is None:
        raise cfgmod.ConfigError(f"no runtime recorded for namespace '{cfg['namespace']}' in "
                                 f"{cfg['state_dir']}: run `mmsb-dist start`, or give --address")
    if not cfg["address"]:
        _apply_ray_env(state)
    cfgmod.check_address({**cfg, "address": address,
                          "_sources": {**cfg["_sources"], "address": "the state file"
                                       if not cfg["address"] else cfg["_sources"]["address"]}})
    import ray

    from mmsb_dist import runtime

    if not ray.is_initialized():
        ray.init(address=address, namespace=cfg["namespace"], log_to_driver=False)
    try:
        return runtime.Bus(cfg["namespace"])
    except ValueError:
        raise cfgmod.ConfigError(f"no mmsb-dist runtime in namespace '{cfg['namespace']}' on "
                                 f"{address}: run `mmsb-dist start`") from None


def _disconnect() -> None:
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()


# ---- the group -------------------------------------------------------------------------------------

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmsb-dist")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="YAML settings over configs/default.yaml (also: MMSB_CONFIG).")
@click.option("--namespace", default=None, help="Ray namespace of the runtime (default: mmsb).")
@click.option("--address", default=None,
              help="Ray cluster: HOST:PORT of its head, or auto (default: a local head).")
@click.pass_context
def main(ctx, config, namespace, address) -> None:
    """mmsb-dist: distributed GPU-resident pages with ordered logs, epochs and replay."""
    ctx.obj = {"config": config, "namespace": namespace, "address": address}


# ---- start / stop ------------------------------------------------------------------------------

@main.command()
@click.option("--shards", type=int, default=None, help="Shard actors (config: shards).")
@click.option("--data-dir", default=None, help="Logs and checkpoints (config: data_dir).")
@click.option("--backend", default=None, help="auto, numpy or cupy (config: backend).")
@click.option("--fsync", default=None, help="always, interval or none (config: fsync).")
@click.option("--auto-commit-s", type=float, default=None,
              help="Commit every so many seconds; 0: only on request.")
@click.option("--gpus-per-shard", type=float, default=None)
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local head (ray.num_cpus).")
@click.option("--dashboard-port", type=int, default=None, help="ray.dashboard_port")
@click.option("--ray-port", type=int, default=None, help="ray.port (GCS of the local head)")
@click.option("--metrics-export-port", type=int, default=None, help="ray.metrics_export_port")
@click.option("--gateway/--no-gateway", default=None, help="Start the HTTP gateway too.")
@click.option("--gateway-port", type=int, default=None)
@common
@click.pass_context
def start(ctx, shards, data_dir, backend, fsync, auto_commit_s, gpus_per_shard, num_cpus,
          dashboard_port, ray_port, metrics_export_port, gateway, gateway_port) -> None:
    """Start the runtime (and a local Ray head unless --address is given)."""
    with _clean_errors():
        cfg = _settings(ctx, shards=shards, data_dir=data_dir, backend=backend, fsync=fsync,
                        auto_commit_s=auto_commit_s, gpus_per_shard=gpus_per_shard,
                        **{"ray.num_cpus": num_cpus, "ray.dashboard_port": dashboard_port,
                           "ray.port": ray_port, "ray.metrics_export_port": metrics_export_port,
                           "gateway.enabled": gateway, "gateway.port": gateway_port})
        cfgmod.check_data_dir(cfg)
        state = _start_ray(cfg)
        try:
            _start_runtime(cfg, state)
        except BaseException:
            if state.get("started_head") and not state.get("reused"):
                from mmsb_dist.localray import stop_nodes
                stop_nodes(state["temp_dir"], state["port"])
            raise
        finally:
            _disconnect()
        state.pop("reused", None)
        _write_state(cfg, state)
        _print_started(state)


def _start_ray(cfg: dict) -> dict:
    from mmsb_dist import localray

    ns, ray_cfg = cfg["namespace"], cfg["ray"]
    if cfg["address"] is not None:
        cfgmod.check_address(cfg)
        return {"namespace": ns, "address": cfg["address"], "started_head": False,
                "data_dir": cfg["data_dir"]}
    old = _read_state(cfg)
    state = {"namespace": ns, "started_head": True, "data_dir": cfg["data_dir"],
             "port": ray_cfg["port"], "temp_dir": ray_cfg["temp_dir"],
             "address": f"127.0.0.1:{ray_cfg['port']}",
             "metrics_url": f"http://127.0.0.1:{ray_cfg['metrics_export_port']}/metrics",
             "dashboard_url": (f"http://127.0.0.1:{ray_cfg['dashboard_port']}"
                               if ray_cfg["dashboard"] else None),
             # A head started with `ray start` turns token authentication on (Ray >= 2.59) and
             # keeps the token in ~/.ray/auth_token; clients must ask for it explicitly.
             "ray_env": {_AUTH_ENV: os.environ.get(_AUTH_ENV, "token")}}
    if old.get("started_head") and localray.reachable("127.0.0.1", old["port"]):
        state.update({k: old[k] for k in ("port", "temp_dir", "address", "metrics_url",
                                          "dashboard_url", "ray_env") if k in old})
        state["reused"] = True
    else:
        num_cpus = ray_cfg["num_cpus"] or max(os.cpu_count() or 1, cfg["shards"] + 1)
        localray.start_head(temp_dir=ray_cfg["temp_dir"], port=ray_cfg["port"],
                            dashboard_port=ray_cfg["dashboard_port"],
                            metrics_export_port=ray_cfg["metrics_export_port"],
                            client_server_port=ray_cfg["client_server_port"], num_cpus=num_cpus,
                            object_store_memory_bytes=ray_cfg["object_store_memory_bytes"],
                            dashboard=ray_cfg["dashboard"])
    _apply_ray_env(state)
    return state


def _start_runtime(cfg: dict, state: dict) -> None:
    import ray

    from mmsb_dist import runtime

    ns = cfg["namespace"]
    ray.init(address=state["address"], namespace=ns, log_to_driver=False)
    try:
        bus = runtime.Bus(ns)
        state["already_running"] = True
    except ValueError:  # no coordinator yet: place the shards
        cfgmod.check_resources(cfg, ray.cluster_resources())
        bus = runtime.start(cfg["shards"], cfg["data_dir"], cfgmod.runtime_config(cfg),
                            namespace=ns)
        state["already_running"] = False
    state["shards"] = bus.n
    state["data_dir"] = bus.info["data_dir"]
    gw = cfg["gateway"]
    if gw["enabled"]:
        start_gateway = _gateway_module().start_gateway
        state["gateway_url"] = start_gateway(
            namespace=ns, host=gw["host"], port=gw["port"], token=gw["token"],
            max_body_bytes=gw["max_body_bytes"], max_batch_deltas=gw["max_batch_deltas"],
            rate_per_s=gw["rate_per_s"], rate_burst=gw["rate_burst"])


def _gateway_module():
    try:
        from mmsb_dist import gateway
    except ImportError as exc:
        raise cfgmod.ConfigError(f"the HTTP gateway is not available in this install ({exc}): "
                                 "start without --gateway (gateway.enabled: false)") from None
    return gateway


def _print_started(state: dict) -> None:
    verb = "already running" if state.get("already_running") else "started"
    click.echo(f"mmsb-dist {verb}: namespace {state['namespace']}, {state['shards']} shard(s), "
               f"data in {state['data_dir']}")
    click.echo(f"  ray address   {state['address']}"
               + ("  (local head started by mmsb-dist)" if state["started_head"] else ""))
    if state.get("dashboard_url"):
        click.echo(f"  dashboard     {state['dashboard_url']}  "
                   f"(ray job submit --address {state['dashboard_url']} ...)")
    if state.get("metrics_url"):
        click.echo(f"  metrics       {state['metrics_url']}")
    if state.get("gateway_url"):
        click.echo(f"  gateway       {state['gateway_url']}")
    env = " ".join(f"{k}={v}" for k, v in (state.get("ray_env") or {}).items())
    click.echo(f"  drivers       export RAY_ADDRESS={state['address']} {env}".rstrip()
               + f"; then mmsb_dist.connect(namespace={state['namespace']!r})")


@main.command()
@common
@click.pass_context
def stop(ctx) -> None:
    """Stop the gateway and the actors (data stays), and the local head if start started it."""
    with _clean_errors():
        cfg = _settings(ctx)
        state = _read_state(cfg)
        address = cfg["address"] or state.get("address")
        if address is None:
            raise cfgmod.ConfigError(f"no runtime recorded for namespace '{cfg['namespace']}': "
                                     "nothing to stop (give --address to stop one on a cluster)")
        _apply_ray_env(state)
        from mmsb_dist import localray

        target = cfgmod.parse_address(address, "state")
        if target is None or localray.reachable(*target):
            _stop_runtime(cfg, address, state)
        if state.get("started_head") and not cfg["address"]:
            n = localray.stop_nodes(state["temp_dir"], state["port"])
            click.echo(f"local Ray head stopped ({n} processes)")
        with contextlib.suppress(FileNotFoundError):
            _state_path(cfg).unlink()


def _stop_runtime(cfg: dict, address: str, state: dict) -> None:
    import ray

    from mmsb_dist import runtime

    ns = cfg["namespace"]
    ray.init(address=address, namespace=ns, log_to_driver=False)
    try:
        if state.get("gateway_url"):
            _gateway_module().stop_gateway(ns)
            click.echo("gateway stopped")
        runtime.stop(namespace=ns)
        click.echo(f"runtime '{ns}' stopped (data stays in {state.get('data_dir', 'its data_dir')})")
    finally:
        _disconnect()


# ---- status ------------------------------------------------------------------------------------

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@common
@click.pass_context
def status(ctx, as_json) -> None:
    """Shards, nodes, pages, epochs, logs, checkpoints, replay lag and metrics totals."""
    with _clean_errors():
        cfg = _settings(ctx)
        try:
            bus = _connect(cfg)
            import ray

            stats = bus.stats()
            nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        finally:
            _disconnect()
        for s in stats["shards"]:
            s["node_address"] = nodes.get(s["node"], "?")
        if as_json:
            click.echo(json.dumps(stats, default=str, indent=1))
        else:
            click.echo(render_status(stats))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_status(stats: dict) -> str:
    """The status table: one row per shard, then the coordinator's epochs and commits."""
    head = ["shard", "node", "backend", "pages", "bytes", "epoch open/sealed", "log",
            "checkpoint", "replay lag", "writes", "fsync s"]
    rows = []
    for s in sorted(stats["shards"], key=lambda s: s["shard"]):
        m = s["metrics"]
        ckpt = f"epoch {m['checkpoint_epoch']}" if m["checkpoint_epoch"] else "none"
        rows.append([str(s["shard"]), f"{s['node'][:8]} {s.get('node_address', '')}".strip(),
                     s["backend"], f"{s['pages']:,}", _size(s["page_bytes"]),
                     f"{s['open_epoch']}/{s['last_sealed']}", _size(m["log_bytes"]), ckpt,
                     f"{m['replay_lag_lsns']:,} LSNs", f"{m['writes']:,}",
                     f"{m['fsync_seconds']:.3f}"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    committed, c = stats["committed"], stats.get("coordinator", {})
    shown = ", ".join(map(str, committed[-8:])) + (" ..." if len(committed) > 8 else "")
    lines.append("")
    lines.append(f"committed epochs: {len(committed)} (last {committed[-1] if committed else '-'}"
                 f"{': ' + shown if committed else ''})")
    if c:
        last = c.get("last_commit_seconds")
        lines.append(f"commits since coordinator start: {c['commits']}, aborted "
                     f"{c['commit_aborts']}, last took "
                     + (f"{last * 1000:.1f} ms" if last is not None else "-"))
    return "\n".join(lines)


# ---- epoch operations --------------------------------------------------------------------------

def _bus_call(ctx, what):
    with _clean_errors():
        cfg = _settings(ctx)
        try:
            return what(_connect(cfg))
        finally:
            _disconnect()


@main.command()
@common
@click.pass_context
def commit(ctx) -> None:
    """Close the open epoch on every shard (two-phase)."""
    click.echo(f"committed epoch {_bus_call(ctx, lambda bus: bus.commit())}")


@main.command()
@common
@click.pass_context
def checkpoint(ctx) -> None:
    """Checkpoint every shard at the last committed epoch."""
    click.echo(f"checkpointed epoch {_bus_call(ctx, lambda bus: bus.checkpoint())}")


@main.command()
@click.argument("epoch", type=click.IntRange(1))
@common
@click.pass_context
def replay(ctx, epoch) -> None:
    """Rebuild every shard at EPOCH beside the live state and check the recorded hashes."""
    hashes = _bus_call(ctx, lambda bus: bus.replay(epoch))
    click.echo(f"epoch {epoch} replayed on {len(hashes)} shard(s); every state hash matches")
    for shard, h in sorted(hashes.items()):
        click.echo(f"  shard {shard}  {h}")


@main.command()
@click.argument("epoch", type=click.IntRange(1))
@common
@click.pass_context
def restore(ctx, epoch) -> None:
    """Roll the live state back to committed EPOCH (committed again as a new epoch)."""
    new = _bus_call(ctx, lambda bus: bus.restore(epoch))
    click.echo(f"restored epoch {epoch}; the restored state is committed as epoch {new}")


# ---- bench / demo ------------------------------------------------------------------------------

def _benchmarks_dir() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks").is_dir():
            return root / "benchmarks"
    return None


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("suite")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(suite, args) -> None:
    """Run benchmarks/bench_SUITE.py of a source checkout (extra ARGS go to it, e.g. --quick)."""
    where = _benchmarks_dir()
    if where is None:
        raise click.ClickException("no benchmarks/ directory here: `bench` runs from a source "
                                   "checkout of mmsb-dist (run it in the repository's root)")
    suites = sorted(p.stem[len("bench_"):] for p in where.glob("bench_*.py"))
    script = where / f"bench_{suite}.py"
    if not script.is_file():
        raise click.ClickException(f"no benchmark suite {suite!r} in {where}: choose one of "
                                   f"{', '.join(suites)}")
    sys.exit(subprocess.call([sys.executable, str(script), *args], cwd=where.parent))


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the demo runtime keeps its data (a fresh subdirectory is made; default: "
                   "a temporary directory, removed afterwards).")
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default="auto",
              show_default=True, help="auto: CuPy when a GPU is visible, else NumPy.")
@click.option("--shards", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option("--pages", type=click.IntRange(16, 1 << 20), default=4096, show_default=True)
@click.option("--batches", type=click.IntRange(6, 100_000), default=60, show_default=True,
              help="Batches of 10,000 64-byte writes to ingest.")
def demo(data_dir, backend, shards, pages, batches) -> None:
    """Start embedded, ingest, commit, checkpoint, kill a shard, recover, verify by replay."""
    from mmsb_dist.demo import DemoConfig, run

    with _clean_errors():
        report = run(DemoConfig(data_dir=data_dir, backend=backend, shards=shards, pages=pages,
                                batches=batches))
    click.echo(report.render())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
