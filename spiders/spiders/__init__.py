"""Spiders (one per file; the file, ``name`` and class agree)."""
