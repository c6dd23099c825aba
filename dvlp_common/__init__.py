"""Shared infrastructure of every stage: typed configs (``config``), counted skips of bad records (``records``),
atomic writes (``io``), the keyed array cache (``cache``), the model zoo and its converters (``zoo``), precision,
seeding and report tables."""
