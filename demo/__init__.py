"""The deterministic synthetic demo marketplace.

* :mod:`demo.render` — drawing: cars with a per-class look, non-car photos,
  deliberately broken encodings;
* :mod:`demo.generate` — :func:`generate_site`: the static site with its
  planted problems and ``ground_truth.json``;
* :mod:`demo.server` — :class:`DemoSite`: a threaded HTTP server over the
  generated folder, with a request log; :func:`serve_forever` for the CLI;
* :mod:`demo.truth` — what a correct crawl + ingest must produce.

The names below are imported lazily so that ``import demo`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoSite", "generate_site", "serve_forever"]


def __getattr__(name: str) -> Any:
    if name == "generate_site":
        from demo.generate import generate_site

        return generate_site
    if name in ("DemoSite", "serve_forever"):
        from demo import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
