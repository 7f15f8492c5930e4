"""A second marketplace built unlike the demo, crawled through ``carflow crawl`` as a new
user would: a profile written from TEMPLATE.yaml in the user's own folder (relative and
absolute paths), the user's ``carflow.yaml``, lazy-loaded photos behind a placeholder
GIF, login links that carry a listing URL in ``next=``, prices only in the title with
``$`` meaning Mexican pesos and ``.`` as the thousands separator."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from carflow.storage import open_storage, sha256_hex

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER_GIF = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
USER_AGENT = "acme-carflow-test/1.0 (+mailto:ml@acme.example)"

#: id → (make, model, year, title)
CARS = {
    "101": ("Ford", "Focus", 2010, "Ford Focus 1.6 Titanium 2010 – $ 189.500"),
    "102": ("Volkswagen", "Jetta", 2015, "VW Jetta 2.0 2015, 98.000 km – $ 245.000"),
    "103": ("Nissan", "Versa", 2019, "Nissan Versa 1.6 Advance 2019 – $ 231.900"),
    "104": ("Mazda", "3", 2017, "Mazda 3 2.5 s 2017 – $ 299.000"),
}
PRICES = {"101": 189500.0, "102": 245000.0, "103": 231900.0, "104": 299000.0}


def _jpeg(seed: int) -> bytes:
    im = Image.new("RGB", (160, 120), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    for x in range(0, 160, 8):
        im.putpixel((x, (x * seed) % 120), (255, 255, 255))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


def _site() -> dict[str, tuple[str, bytes]]:
    pages: dict[str, tuple[str, bytes]] = {
        "/robots.txt": ("text/plain", b"User-agent: *\nDisallow: /cuenta/\n"),
        "/static/p.gif": ("image/gif", PLACEHOLDER_GIF),
    }
    ids = list(CARS)
    for page, chunk in enumerate((ids[:2], ids[2:]), 1):
        items = "".join(
            f'<li><a href="/autos/{i}-{CARS[i][1].lower()}">{CARS[i][3]}</a> '
            f'<a href="/cuenta/entrar?next=/autos/{i}-{CARS[i][1].lower()}">guardar</a></li>'
            for i in chunk
        )
        more = '<a class="mas" href="/buscar?pagina=2">más</a>' if page == 1 else ""
        pages[f"/buscar?pagina={page}"] = (
            "text/html", f"<html><body><ul class='lista'>{items}</ul>{more}</body></html>".encode())
    for n, (i, (make, model, year, title)) in enumerate(CARS.items()):
        photos = "".join(f'<img src="/static/p.gif" data-lazy="/fotos/{i}-{k}.jpg">' for k in range(2))
        # one element a naive profile also matches: only the placeholder
        photos += '<img src="/static/p.gif" alt="">'
        body = (f"<html><body><h1 class='tit'>{title}</h1><table>"
                f"<tr><th>Marca</th><td class='marca'>{make}</td></tr>"
                f"<tr><th>Modelo</th><td class='modelo'>{model}</td></tr>"
                f"<tr><th>Año</th><td class='anio'>{year}</td></tr></table>"
                f"<div class='fotos'>{photos}</div></body></html>")
        pages[f"/autos/{i}-{model.lower()}"] = ("text/html", body.encode())
        for k in range(2):
            pages[f"/fotos/{i}-{k}.jpg"] = ("image/jpeg", _jpeg(10 * n + k + 1))
    return pages


PROFILE = """\
name: autos
base_url: http://example.invalid
start_urls: ["{base_url}/buscar?pagina=1"]
allowed_domains: ["{base_url}"]
listing_links: "ul.lista a::attr(href)"
pagination: "a.mas::attr(href)"
listing_id_regex: '/autos/(?P<id>\\d+)'
fields:
  title: "h1.tit::text"
  make: "td.marca::text"
  model: "td.modelo::text"
  year: "td.anio::text"
  price: "h1.tit::text"
  images: "div.fotos img"
currency: MXN
politeness:
  autothrottle: false
  download_delay: 0
"""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.server.log.append((self.path, self.headers.get("User-Agent")))
        page = self.server.pages.get(self.path)
        if page is None:
            self.send_error(404)
            return
        ctype, body = page
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def other_site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.pages, server.log = _site(), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


def _carflow(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _records(store) -> list[dict]:
    out = []
    for key in store.list("listings/autos/"):
        out += [json.loads(line) for line in store.get_text(key).splitlines() if line.strip()]
    return out


def test_carflow_crawl_of_a_site_unlike_the_demo(other_site, tmp_path, prefect_server):
    from prefect.settings import PREFECT_API_URL

    user = tmp_path / "user"
    (user / "profiles").mkdir(parents=True)
    (user / "profiles" / "autos.yaml").write_text(PROFILE)
    (user / "carflow.yaml").write_text(f"crawl:\n  user_agent: \"{USER_AGENT}\"\n")
    prefect = {"PREFECT_API_URL": PREFECT_API_URL.value()}

    # a relative profile path from the user's folder, a quick trial of 2 listings
    proc = _carflow(["crawl", "profiles/autos.yaml", "--base-url", other_site.url, "--storage", "store",
                     "--max-listings", "2"], user, prefect)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = open_storage(user / "store")  # relative to the user's folder, not the repo's
    assert len(_records(store)) == 2

    # the absolute path, as TEMPLATE.yaml and --help document it
    proc = _carflow(["crawl", str(user / "profiles" / "autos.yaml"), "--base-url", other_site.url,
                     "--storage", "store"], user, prefect)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["finish_reason"] == "finished"

    records = {r["listing_id"]: r for r in _records(store)}
    assert set(records) == {f"autos:{i}" for i in CARS}
    for i, rec in ((k.split(":")[1], v) for k, v in records.items()):
        # prices from the title: the number by the currency, not the engine size or year;
        # "$" is the profile's MXN; "." separates thousands
        assert (rec["price"], rec["currency"]) == (PRICES[i], "MXN"), rec["attributes"]["price_raw"]
        assert rec["year"] == CARS[i][2]
        # the lazy-loaded photos, never the placeholder GIF
        stored = [img for img in rec["images"] if img["status"] in ("stored", "known")]
        assert [img["url"].rsplit("/", 1)[-1] for img in stored] == [f"{i}-0.jpg", f"{i}-1.jpg"]
        assert {img["image_id"] for img in stored} == {
            sha256_hex(other_site.pages[f"/fotos/{i}-{k}.jpg"][1]) for k in range(2)}
        assert [img["reason"] for img in rec["images"] if img["status"] == "rejected"] == ["placeholder"]
    assert not store.exists(f"raw/{sha256_hex(PLACEHOLDER_GIF)[:2]}/{sha256_hex(PLACEHOLDER_GIF)}")

    # the login links were never queued as listings, so nothing counts them as failed
    assert not [p for p, _ua in other_site.log if p.startswith("/cuenta/")]
    stats = [json.loads(store.get_text(k)) for k in store.list("crawls/autos/")]
    assert all(not any(k.startswith("carflow/listing/failed/") for k in s) for s in stats)
    assert sum(s.get("carflow/search/link_without_id", 0) for s in stats) >= 4
    # every request carried the User-Agent of the user's carflow.yaml
    assert {ua for _p, ua in other_site.log} == {USER_AGENT}


def test_carflow_crawl_user_errors_are_one_line(other_site, tmp_path):
    """A profile path that does not exist: exit 2, one line naming it, no traceback."""
    proc = _carflow(["crawl", "profiles/typo.yaml"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("carflow:")]
    assert len(line) == 1 and "typo.yaml" in line[0] and "does not exist" in line[0]
