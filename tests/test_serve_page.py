"""The web page in a real browser: Debian's headless chromium driven by Playwright
(``make browser`` installs it), against the app under uvicorn on loopback. Screenshots
are saved under ``test-artifacts/serve-page/`` (or ``$CARFLOW_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_helpers import jpeg, register_stand_ins, running, scene, stand_in_loaders

from carflow.registry import Registry
from carflow.settings import load_settings

CHROMIUM = os.environ.get("CARFLOW_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("CARFLOW_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: run `make browser`"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from serve.app import create_app

    root = tmp_path_factory.mktemp("serve-page") / "store"
    registry = Registry(str(root))
    register_stand_ins(registry, "v1")
    app = create_app(load_settings(storage={"root": str(root)}), loaders=stand_in_loaders(), registry=registry)
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def shots() -> Path:
    out = ARTIFACTS / "serve-page"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_upload_a_photo_shows_the_top5_and_the_box(base, browser):
    page = browser.new_page()
    page.goto(base + "/")
    page.set_input_files("#file", files=[{"name": "car.jpg", "mimeType": "image/jpeg",
                                          "buffer": jpeg(scene("bmw_3-series", seed=3))}])
    page.wait_for_function("document.querySelectorAll('#top5 .bar').length === 5", timeout=30_000)
    page.wait_for_function("document.getElementById('photo').dataset.box !== undefined", timeout=10_000)
    labels = page.eval_on_selector_all("#top5 .bar", "els => els.map(e => e.dataset.label)")
    widths = page.eval_on_selector_all("#top5 .bar .fill", "els => els.map(e => parseFloat(e.style.width))")
    box = page.eval_on_selector("#photo", "c => c.dataset.box")
    assert labels[0] == "bmw_3-series" and len(set(labels)) == 5
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert [int(v) for v in box.split(",")] == [50, 43, 270, 197]
    assert page.inner_text("#message") == "bmw 3-series"
    # the box is drawn: the canvas pixel on its left edge is the stroke colour
    pixel = page.evaluate("""() => { const c = document.getElementById('photo');
        return Array.from(c.getContext('2d').getImageData(50, 120, 1, 1).data).slice(0, 3); }""")
    assert pixel[0] > 200 and pixel[1] < 90, pixel
    page.screenshot(path=str(shots() / "top5.png"), full_page=True)
    page.close()


def test_upload_a_text_file_shows_the_rejection(base, browser):
    page = browser.new_page()
    page.goto(base + "/")
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                          "buffer": b"this is not a photo of a car\n"}])
    page.wait_for_function("document.getElementById('message').dataset.reason === 'not_image'", timeout=30_000)
    assert page.inner_text("#message") == "this file is not an image"
    assert page.eval_on_selector_all("#top5 .bar", "els => els.length") == 0
    page.screenshot(path=str(shots() / "rejected-text.png"), full_page=True)
    page.set_input_files("#file", files=[{"name": "street.jpg", "mimeType": "image/jpeg",
                                          "buffer": jpeg(scene(None))}])
    page.wait_for_function("document.getElementById('message').dataset.reason === 'no_car'", timeout=30_000)
    assert page.inner_text("#message") == "no car found in this photo"
    page.screenshot(path=str(shots() / "rejected-no-car.png"), full_page=True)
    page.close()
