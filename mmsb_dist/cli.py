"""The ``mmsb-dist`` command.

``mmsb-dist demo`` is the README's main job: an embedded shard, a realistic workload, a SIGKILL,
recovery and verification (see mmsb_dist/demo.py). The runtime commands (start, status, commit,
checkpoint, replay, restore) come with the Ray runtime.
"""

from __future__ import annotations

import sys

import click

from mmsb_dist import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmsb-dist")
def main() -> None:
    """mmsb-dist: distributed GPU-resident pages with ordered logs, epochs and replay."""


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the demo shard lives (a fresh subdirectory is made; default: a "
                   "temporary directory, removed afterwards).")
@click.option("--backend", type=click.Choice(["auto", "numpy", "cupy"]), default="auto",
              show_default=True, help="auto: CuPy when a GPU is visible, else NumPy.")
@click.option("--pages", type=click.IntRange(1, 1 << 22), default=16384, show_default=True)
@click.option("--batches", type=click.IntRange(4, 100_000), default=120, show_default=True,
              help="Batches of 10,000 64-byte writes to ingest before the crash.")
def demo(data_dir, backend, pages, batches) -> None:
    """Ingest, seal, checkpoint, crash (SIGKILL), recover and verify by replay."""
    from mmsb_dist.demo import DemoConfig, run
    from mmsb_dist.errors import MmsbError

    try:
        report = run(DemoConfig(data_dir=data_dir, backend=backend, pages=pages, batches=batches))
    except MmsbError as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    click.echo(report.render())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
