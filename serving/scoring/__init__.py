"""Batch scoring of GeoTIFF pairs: `rarechange score` (one pair, or a manifest of many)."""
