"""Which packages the wheel and sdist hold (the rest of the metadata is pyproject.toml's).

The repository's top-level ``conf/`` ships inside the package as ``sweeper/conf/`` (``package_dir`` maps
it; each group folder is a subpackage of YAML files, ``package-data`` in pyproject.toml), so Hydra finds
the groups from any folder once installed: :data:`sweeper.paths.CONF_DIR` says where they are. The
per-machine ``conf/local/`` stays out. ``hydra_plugins/`` is a namespace package (no ``__init__.py``),
as Hydra's plugin scan requires.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

CONF = Path("conf")
conf_packages = ["sweeper.conf"] + sorted(
    ".".join(("sweeper", *d.parts)) for d in CONF.rglob("*")
    if d.is_dir() and d.parts[1] != "local" and d.name != "__pycache__")

setup(
    packages=find_namespace_packages(include=["sweeper", "sweeper.*", "hydra_plugins.*"],
                                     exclude=["*__pycache__*"]) + conf_packages,
    package_dir={"sweeper.conf": "conf"},
)
