"""The ``carflow`` command: one sub-command per flow, each with exactly the flags of
``python -m flows.<module>`` (the sub-command hands its arguments to that module's
``main``). ``carflow --help`` lists them; ``carflow <command> --help`` shows the flow's own.

The CLI lives in ``flows/`` because it runs flows; the core package never imports it.
Nothing else is imported until a sub-command runs. Every flow's ``main`` goes through
``flows.entry.entry_point``: a user's mistake (``carflow.errors.UserError``: a missing
path or input manifest, a bad setting or profile) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from flows.entry import entry_point

#: command → ("module[:function]" taking argv, default ``main``; argv prefix; one-line help)
COMMANDS: dict[str, tuple[str, list[str], str]] = {
    "demo-site": ("flows.demo:site_main", [], "generate (and serve) the synthetic demo marketplace"),
    "crawl": ("flows.crawl", [], "crawl a site profile into storage"),
    "ingest": ("flows.ingest", [], "listing feeds (or a seed-style folder dataset) → manifest v0"),
    "clean": ("flows.clean", [], "fix → quality → dedup"),
    "car-filter": ("flows.car_filter", [], "car/no-car filter: kit | train | score"),
    "crop": ("flows.crop", [], "YOLO crop of the largest car/truck (crop train: fine-tune the detector)"),
    "dataset": ("flows.dataset", [], "classes → listing-grouped split → exports"),
    "evaluate": ("flows.evaluate", [], "evaluate a classifier: metrics, calibration, label issues (--promote)"),
    "train": ("flows.train", [], "train, evaluate and register a make/model classifier (latest dataset)"),
    "pipeline": ("flows.pipeline", [], "the nightly DAG, once"),
    "demo": ("flows.demo", [], "the whole job on the demo marketplace"),
    "serve": ("serve.app", [], "the prediction API and its web page (FastAPI on uvicorn)"),
    "settings": ("flows.cli:settings_main", [], "print the effective settings (secrets masked)"),
}


@entry_point
def settings_main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="carflow settings", description="print the effective settings").parse_args(argv)
    from carflow.settings import get_settings

    print(json.dumps(get_settings().public_dict(), indent=2, default=str))
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: carflow <command> [flags]   (carflow <command> --help for its flags)", "",
             "car listings → clean labelled image dataset → classifier", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_m, _p, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"carflow: unknown command {name!r}; `carflow --help` lists them", file=sys.stderr)
        return 2
    target, prefix, _help = COMMANDS[name]
    module, _, function = target.partition(":")
    # every flow's main goes through flows.entry.entry_point: Prefect defaults, settings
    # first, a UserError as one line with exit code 2
    result = getattr(importlib.import_module(module), function or "main")([*prefix, *rest])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
