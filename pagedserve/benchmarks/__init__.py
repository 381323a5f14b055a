"""Benchmark clients that run against a live server (`pagedserve bench ...`)."""
