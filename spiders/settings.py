"""Scrapy settings of the carflow crawl (``scrapy.cfg`` → ``spiders.settings``).

Politeness defaults come from carflow's typed settings (``crawl`` section:
``CARFLOW_CRAWL__USER_AGENT``, ``CARFLOW_CRAWL__DOWNLOAD_DELAY``, … or ``carflow.yaml``).
Priority, lowest first: these defaults → the site profile (``politeness`` and
``scrapy_settings``) → ``-s NAME=VALUE`` on the command line.
"""

from __future__ import annotations

from typing import Any


def politeness_settings(crawl: Any) -> dict[str, Any]:
    """Scrapy settings from a :class:`carflow.settings.CrawlSettings`."""
    return {
        "USER_AGENT": crawl.user_agent,
        "ROBOTSTXT_OBEY": crawl.obey_robots,
        "AUTOTHROTTLE_ENABLED": crawl.autothrottle,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": crawl.autothrottle_target_concurrency,
        "AUTOTHROTTLE_START_DELAY": max(crawl.download_delay, 1.0),
        "AUTOTHROTTLE_MAX_DELAY": 30.0,
        "CONCURRENT_REQUESTS": crawl.concurrent_requests,
        "CONCURRENT_REQUESTS_PER_DOMAIN": crawl.concurrent_requests_per_domain,
        "DOWNLOAD_DELAY": crawl.download_delay,
        "DOWNLOAD_TIMEOUT": crawl.download_timeout,
        "DOWNLOAD_MAXSIZE": crawl.download_maxsize,
        "DOWNLOAD_WARNSIZE": max(crawl.download_maxsize // 2, 1024),
        "RETRY_ENABLED": True,
        "RETRY_TIMES": crawl.retry_times,
    }


def _crawl_settings() -> Any:
    from carflow.settings import get_settings

    return get_settings().crawl


BOT_NAME = "carflow"
SPIDER_MODULES = ["spiders.spiders"]
NEWSPIDER_MODULE = "spiders.spiders"

# politeness (from carflow settings; a site profile or -s may override)
globals().update(politeness_settings(_crawl_settings()))

# off-domain requests are dropped: spider.allowed_domains (from the profile) + Scrapy's
# OffsiteMiddleware (on by default, spider and downloader side; it also covers photos)
# photos: redirects followed (CDNs redirect), every status reaches the pipeline
MEDIA_ALLOW_REDIRECTS = True

ITEM_PIPELINES = {
    "spiders.pipelines.normalise.NormalisePipeline": 100,
    "spiders.pipelines.photos.PhotosPipeline": 200,
    "spiders.pipelines.feed.FeedPipeline": 800,
}
EXTENSIONS = {
    "spiders.extensions.CrawlStatsWriter": 1000,
    "scrapy.extensions.telnet.TelnetConsole": None,
}
DOWNLOADER_MIDDLEWARES = {
    # after robots.txt (100) and offsite (50), before everything that sends
    "spiders.middlewares.SkipKnownListingsMiddleware": 120,
}

#: listing records per feed part (S3 has no append: each part is one object)
CARFLOW_FEED_PART_SIZE = 50

# the photos of one listing are downloaded together; keep the number of listings being
# processed at once moderate so photos finish (and feed parts flush) steadily
CONCURRENT_ITEMS = 32
REACTOR_THREADPOOL_MAXSIZE = 16
TELNETCONSOLE_ENABLED = False
REMOTE_CONTROL_ENABLED = False  # Scrapy ≥ 2.19 would open an HTTP control port per crawl
LOG_LEVEL = "INFO"
FEED_EXPORT_ENCODING = "utf-8"
# a stopped crawl resumes with -s JOBDIR=... (the scheduler queue, dupefilter and
# spider.state, which keeps the crawl id, live there)
