"""carflow's crawl layer: the Scrapy project (settings, items, site profiles, the
``listings`` spider and its pipelines). Run ``scrapy crawl listings -a site=demo`` from
the repository root, or :func:`spiders.run.run_crawl` from Python."""
