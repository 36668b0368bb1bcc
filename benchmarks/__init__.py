"""Benchmarks: ``python -m benchmarks.NAME``; each prints ratios against a baseline measured in
the same run and writes JSON."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, out: dict) -> Path:
    """Write a benchmark's results ``out`` to ``path`` atomically (parents created), print
    where, and return the resolved path."""
    from ocljax.run.results import write_atomic

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def quick_parser(prog: str, doc: str, quick_help: str = "a shorter stream"):
    """The common command line of a benchmark, for one that adds options of its own:
    ``--quick`` and ``--json PATH`` (default ``bench_results/<name>.json``, ``<name>`` the
    module's last dotted part)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--json", default=f"bench_results/{prog.rsplit('.', 1)[-1]}.json")
    return p


def quick_args(prog: str, doc: str, argv=None, quick_help: str = "a shorter stream"):
    """Parse the common command line of a benchmark (``quick_parser``)."""
    return quick_parser(prog, doc, quick_help).parse_args(argv)
