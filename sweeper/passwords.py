"""Keep a storage password out of every file the sweep writes.

A password in ``hydra.sweeper.storage`` (``postgresql://bob:pw@db/sweeps``) would otherwise land in
each job's ``.hydra/hydra.yaml`` (Hydra saves the config and the command line) and in the command
of every worker started as a process or a SLURM job. So:

- a job masks URL passwords in its own ``.hydra/*.yaml`` as it starts (:func:`scrub_saved_config`);
- workers get the storage URL without its password, and the password in ``PGPASSWORD`` (libpq and
  psycopg read it; SLURM passes the submitting environment to its jobs) (:func:`split_password`).

Better still, never put it in the URL: PostgreSQL reads ``PGPASSWORD`` or ``~/.pgpass`` itself.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["mask_passwords", "scrub_saved_config", "split_password"]

# scheme://user:password@  (the password: anything up to the last @ before the host)
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^:/@\s'\"]+:)([^@\s'\"]+)(@)")


def mask_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


def scrub_saved_config(job_dir: Path) -> None:
    """Mask URL passwords in the config files Hydra saved for this job (``<job dir>/.hydra/*.yaml``)."""
    hydra_dir = Path(job_dir) / ".hydra"
    if not hydra_dir.is_dir():
        return
    for path in hydra_dir.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        masked = mask_passwords(text)
        if masked != text:
            path.write_text(masked, encoding="utf-8")


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password)`` for a PostgreSQL URL with one; else ``(url, None)``
    (other databases take no password from the environment)."""
    if not url.startswith("postgresql"):
        return url, None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.password:
        return url, None
    # URL.set(password=None) keeps the password (None means "unchanged"); the named tuple's _replace drops it
    return parsed._replace(password=None).render_as_string(hide_password=False), str(parsed.password)
