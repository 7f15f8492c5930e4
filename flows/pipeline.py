"""The nightly DAG: crawl every site, ingest, clean, dataset (classes + grouped split)."""

from __future__ import annotations

from prefect import flow

from flows.clean import clean
from flows.crawl import crawl
from flows.dataset import dataset
from flows.ingest import ingest


@flow(name="nightly", log_prints=True)
def nightly(sites: list[str] | None = None, storage: str | None = None, base_urls: dict[str, str] | None = None) -> dict:
    """Crawl each site profile (as a subflow), rebuild manifest v0 from all feeds, clean it,
    then assign classes and splits (assigned listings never move between runs)."""
    sites = sites or ["demo"]
    crawls = {site: crawl(site=site, storage=storage, base_url=(base_urls or {}).get(site)) for site in sites}
    summary = ingest(storage=storage)
    cleaned = clean(storage=storage)
    data = dataset(storage=storage)
    return {"crawls": {s: st.get("crawl_id") for s, st in crawls.items()}, "ingest": summary, "clean": cleaned,
            "dataset": data}


if __name__ == "__main__":
    nightly()
