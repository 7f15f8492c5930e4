"""The ``carflow`` command.

    carflow demo-site --out DIR [--seed 0 --listings 60 --classes 6] [--serve --port 8765]
    carflow crawl SITE [--base-url URL] [--storage URI] [--jobdir DIR]
    carflow ingest [PATH] [--layout crawl|folders] [--site NAME] [--storage URI]
    carflow demo [--listings 60 --classes 6 --seed 0]
    carflow settings

The core package imports nothing above it at import time; each sub-command imports the
flow it runs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_demo_site(a: argparse.Namespace) -> int:
    from carflow.demo_site.generate import generate_site

    gt = generate_site(a.out, seed=a.seed, n_listings=a.listings, n_classes=a.classes)
    print(f"generated {len(gt['listings'])} listings in {a.out} (ground truth: {a.out}/ground_truth.json)")
    if a.serve:
        from carflow.demo_site.server import serve_forever

        print(f"serving http://{a.host}:{a.port}/ (Ctrl-C to stop)", flush=True)
        try:
            serve_forever(a.out, a.host, a.port, a.latency_ms)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_crawl(a: argparse.Namespace) -> int:
    from flows.crawl import main

    argv = [a.site]
    for flag, value in (("--storage", a.storage), ("--base-url", a.base_url), ("--jobdir", a.jobdir),
                        ("--crawl-id", a.crawl_id)):
        if value:
            argv += [flag, value]
    main(argv)
    return 0


def cmd_ingest(a: argparse.Namespace) -> int:
    from flows.ingest import main

    argv: list[str] = []
    if a.storage:
        argv += ["--storage", a.storage]
    if a.path:
        if a.layout != "folders":
            raise SystemExit("carflow ingest PATH needs --layout folders (crawl feeds are read from storage)")
        argv += ["--folders", a.path, "--import-site", a.site]
    main(argv)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from flows.demo import main

    return main(["--seed", str(a.seed), "--listings", str(a.listings), "--classes", str(a.classes)]
                + (["--storage", a.storage] if a.storage else []))


def cmd_settings(_a: argparse.Namespace) -> int:
    from carflow.settings import get_settings

    _print(get_settings().public_dict())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carflow", description="car listings → clean labelled image dataset → classifier")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo-site", help="generate (and serve) the synthetic demo marketplace")
    s.add_argument("--out", default="demo-run/site")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--listings", type=int, default=60)
    s.add_argument("--classes", type=int, default=6)
    s.add_argument("--serve", action="store_true", help="serve it over HTTP after generating")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--latency-ms", type=float, default=0.0)
    s.set_defaults(func=cmd_demo_site)

    s = sub.add_parser("crawl", help="crawl a site profile into storage")
    s.add_argument("site")
    s.add_argument("--storage")
    s.add_argument("--base-url")
    s.add_argument("--jobdir")
    s.add_argument("--crawl-id")
    s.set_defaults(func=cmd_crawl)

    s = sub.add_parser("ingest", help="build manifest v0 from listing feeds, or import a folder dataset")
    s.add_argument("path", nargs="?", help="a seed-style folder dataset (local path or s3://prefix)")
    s.add_argument("--layout", choices=["crawl", "folders"], default="crawl")
    s.add_argument("--site", default="import", help="site name for an imported dataset")
    s.add_argument("--storage")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("demo", help="the whole demo job: demo site → crawl → manifest")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--listings", type=int, default=60)
    s.add_argument("--classes", type=int, default=6)
    s.add_argument("--storage")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("settings", help="print the effective settings (secrets masked)")
    s.set_defaults(func=cmd_settings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from carflow.settings import SettingsError

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"carflow: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
