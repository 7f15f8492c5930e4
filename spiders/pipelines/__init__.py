"""Item pipelines, one class per file, in ``ITEM_PIPELINES`` order:

- ``normalise.NormalisePipeline`` (100): price/year/make/model/label from the raw values;
- ``photos.PhotosPipeline`` (200): download + validate + store photos content-addressed;
- ``feed.FeedPipeline`` (800): listing records → ``listings/<site>/<crawl_id>/part-*.jsonl``.
"""
