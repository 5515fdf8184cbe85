"""The header every benchmark record starts with: what ran it, where and when."""

from __future__ import annotations

import datetime
import platform
import sys

import jax


def run_header() -> dict:
    """Device, versions, UTC date and the command line of this run."""
    d = jax.devices()[0]
    return dict(device=d.device_kind, platform=d.platform, jax=jax.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="PYTHONPATH=. python " + " ".join(sys.argv))
