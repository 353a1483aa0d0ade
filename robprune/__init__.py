"""robprune: concurrent adversarial training and ADMM weight pruning, with a terminal dashboard.

The distribution installs one import name, ``robprune``; its parts live in the repository's top-level folders and
are installed beneath it: ``robprune.engine`` (engine/: training, pruning, attacks, run directories),
``robprune.tui`` (tui/: the dashboard and the command line) and ``robprune.profiles`` (profiles/: the built-in
profiles and experiment presets).
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("robprune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
