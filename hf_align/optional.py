"""Optional dependencies, imported at their point of use: each is installed by an extra of setup.cfg, and an
absent one is reported with the `pip install` line that brings it."""

from __future__ import annotations

import importlib


def import_optional(module: str, extra: str, needed_for: str):
    """`module` imported, or an ImportError naming the hf_align extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f'{needed_for} needs `{module}`, which is not installed: pip install "hf_align[{extra}]"'
                          ) from error
