"""Watchers: they turn arrivals into journal rows (daemon/watchers/base.py says what else they do)."""
