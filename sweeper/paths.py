"""Where the project's own files are: :data:`CONF_DIR`, the Hydra config folder (the groups and their
presets), is the one place that knows it. Imports nothing but ``pathlib``.

Installed from a wheel or sdist, the repository's top-level ``conf/`` ships as ``sweeper/conf/`` (see
``setup.py``); in a checkout (``python train.py``, ``pip install -e``) it is ``conf/`` beside the package.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONF_DIR"]

_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf" / "config.yaml").is_file() else _PACKAGE.parent / "conf"
