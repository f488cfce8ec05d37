"""`python -m daemon.healthcheck`: the container image's HEALTHCHECK, asking the daemon's /healthz.

It reads the same config as the daemon (`$SCANWATCH_CONFIG`, which the image sets to the
path its CMD passes to `scanwatch run`). Exit 0 when /healthz says ready; 1 when it says
unready (an engine down, the pipeline stalled), does not answer, or the config is invalid.
A config without `metrics:` serves no /healthz: then only the config is checked and the
exit is 0, because a daemon that runs is all the container can tell without it.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from daemon.config import find_config, load_config
from daemon.errors import ConfigError

__all__ = ["healthz_url", "main"]

_TIMEOUT_S = 3.0
_EXIT_READY, _EXIT_UNHEALTHY = 0, 1


def healthz_url(listen: str) -> str:
    """The /healthz URL for a `metrics.listen` address; a wildcard host is asked on loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    """Print what /healthz says and return the HEALTHCHECK exit code."""
    path = find_config(None)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"scanwatch healthcheck: {path} is not valid: " + "; ".join(exc.problems))
        return _EXIT_UNHEALTHY
    if config.metrics is None:
        print(f"scanwatch healthcheck: {path} sets no metrics.listen, so there is no /healthz to ask")
        return _EXIT_READY
    url = healthz_url(config.metrics.listen)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            print(response.read().decode(errors="replace"))
            return _EXIT_READY
    except urllib.error.HTTPError as exc:
        print(_reasons(exc.read()) or f"{url}: HTTP {exc.code}")
    except OSError as exc:  # URLError, a refused connection, a timeout
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"scanwatch healthcheck: {url} did not answer: {reason}")
    return _EXIT_UNHEALTHY


def _reasons(body: bytes) -> str:
    """The unready reasons of a /healthz answer, one line."""
    try:
        return "unready: " + "; ".join(str(r) for r in json.loads(body)["reasons"])
    except (ValueError, KeyError, TypeError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
