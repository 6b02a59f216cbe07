"""Where the project's own files are: :data:`CONF_DIR`, the Hydra config folder (the groups and their
presets), is the one place that knows it, and :data:`IN_CHECKOUT`, whether this is a checkout. Imports nothing but ``pathlib``.

Installed from a wheel or sdist, the repository's top-level ``conf/`` ships as ``sweeper/conf/`` (see
``setup.py``); in a checkout (``python train.py``, ``pip install -e``) it is ``conf/`` beside the package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONF_DIR", "IN_CHECKOUT"]

_PACKAGE = Path(__file__).resolve().parent
IN_CHECKOUT = not (_PACKAGE / "conf" / "config.yaml").is_file()  # a checkout (or ``pip install -e``): ``train.py`` beside
CONF_DIR = _PACKAGE.parent / "conf" if IN_CHECKOUT else _PACKAGE / "conf"
