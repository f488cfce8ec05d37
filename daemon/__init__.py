"""scanwatch: watch drop folders, scan every new file, move it where it belongs."""

__version__ = "0.1.0"
