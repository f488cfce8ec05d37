"""Watchers: they only record arrivals in the journal."""
