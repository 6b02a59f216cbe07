"""Keep secrets out of every file the sweep writes and every line it logs.

Two kinds of secret reach the tool through its command line:

- a password in a storage URL (``hydra.sweeper.storage=postgresql://bob:pw@db/sweeps``, or as its
  ``?password=pw`` query parameter), in any quoting and with any URL-encoded character (an ``@`` left
  unencoded is masked with the rest, up to the URL's last ``@``);
- a value whose name says it is secret, mostly set for the jobs' environment with
  ``+hydra.job.env_set.HF_TOKEN=hf_...`` (names with a ``PASSWORD``, ``PASSWD``, ``SECRET``, ``APIKEY`` or
  ``CREDENTIAL(S)`` part, an ``API``/``ACCESS``/``PRIVATE``/``SECRET`` ``KEY``, or ending in ``TOKEN``, ``PWD``,
  ``PASS`` or ``AUTH``: :func:`is_secret_name`; not ``full_key``, ``sort_key``, ``pad_token`` or ``PWD``).

Hydra saves both in each job's ``.hydra/hydra.yaml`` (the config and the command line), and a worker
started as a copy of the command would carry them in its command line (and SLURM's pickled job). So:

- :func:`mask_secrets` replaces them by ``***`` in any text; a job masks its own ``.hydra/*.yaml`` as it
  starts (:func:`scrub_saved_config`), and :func:`install_log_filter` masks every log record of the process
  (its ``train.log``, the console, worker logs), the literal secret values included;
- workers get the storage URL without its password, and the password in ``PGPASSWORD`` (libpq and psycopg
  read it; SLURM passes the submitting environment to its jobs) (:func:`split_password`); secret
  ``env_set`` overrides leave their command line for their environment (:func:`split_secret_overrides`).

Better still, never put them on the command line: PostgreSQL reads ``PGPASSWORD`` or ``~/.pgpass`` itself,
and ``huggingface_hub`` reads ``HF_TOKEN`` from the environment.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = ["install_log_filter", "is_secret_name", "job_secrets", "mask_passwords", "mask_secrets",
           "scrub_saved_config", "secret_values", "split_password", "split_secret_overrides"]

MASK = "***"
# scheme://user:password@  (the password: anything but whitespace up to the last @ before the next whitespace,
# quotes included, so that an @ or : left unencoded in it is masked too)
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.-]*://[^:/@\s'\"]*:)(\S+)(@)")
# ?password=... or &password=... in a URL's query (any name that says it is secret: sslpassword, token)
_QUERY_SECRET = re.compile(r"(?P<pre>[?&](?P<name>[A-Za-z_][\w.-]*)=)(?P<value>[^&\s'\"#]+)")
# a name holding one of these parts names a secret (HF_HUB_SECRET, DB_PASSWORD, GOOGLE_APPLICATION_CREDENTIALS)
_SECRET_PARTS = {"SECRET", "SECRETS", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"}
# ... and one ending in these (HF_TOKEN, PGPASSWORD, DB_PWD, DB_PASS, HTTP_AUTH), unless the whole name is one
# (PWD: the current folder)
_SECRET_ENDINGS = ("TOKEN", "PASSWORD", "PASSWD", "SECRET", "APIKEY", "_PWD", "_PASS", "_AUTH")
# a KEY is a secret one after these words (WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, SSH_PRIVATE_KEY), not a
# config's key (full_key, sort_key, cache_key)
_KEY_WORDS = {"API", "ACCESS", "PRIVATE", "SECRET", "AUTH", "SIGNING", "ENCRYPTION", "MASTER"}
_TOKENIZER_WORDS = {"PAD", "EOS", "BOS", "UNK", "SEP", "CLS", "MASK"}  # special tokens: pad_token, add_eos_token
# name=value (an override) or name: value (YAML); the value plain, '...' (YAML doubles a quote) or "..."
_NAMED = re.compile(r"""(?P<name>[A-Za-z_][\w.]*)(?P<sep>\s*=\s*|:[ \t]+)"""
                    r"""(?P<value>'(?:[^']|'')*'|"(?:[^"\\]|\\.)*"|[^\s,}\]]+)""")


def is_secret_name(name: str) -> bool:
    """Whether a key (its last dotted part) names a secret: ``HF_TOKEN``, ``WANDB_API_KEY``,
    ``AWS_SECRET_ACCESS_KEY``, ``PGPASSWORD``, ``api_key``, ``password``; not ``full_key``, ``tokens_seen``,
    ``max_tokens``, ``pad_token`` or ``PWD``."""
    last = name.rsplit(".", 1)[-1].upper()
    parts = last.split("_")
    if _SECRET_PARTS & set(parts):
        return True
    if any(part.endswith("KEY") and (part[:-3] in _KEY_WORDS or (i and parts[i - 1] in _KEY_WORDS))
           for i, part in enumerate(parts)):
        return True  # API_KEY, APIKEY's kin ACCESSKEY, SECRET_ACCESS_KEY
    if len(parts) > 1 and parts[-1] == "TOKEN" and parts[-2] in _TOKENIZER_WORDS:
        return False
    return last.endswith(_SECRET_ENDINGS)


def mask_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: the one after ``user:`` (up to the last
    ``@``, so that one with an unencoded ``@`` or ``:`` is masked whole) and a secret query parameter's
    (``?password=...``)."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    return _QUERY_SECRET.sub(lambda m: m.group("pre") + MASK if is_secret_name(m.group("name")) else m.group(0), text)


def _url_passwords(url: str) -> list[str]:
    """The passwords written in ``url``: after ``user:`` and in secret query parameters, as written."""
    found = [m.group(2) for m in _URL_PASSWORD.finditer(url)]
    found += [m.group("value") for m in _QUERY_SECRET.finditer(url) if is_secret_name(m.group("name"))]
    return [v for v in found if v != MASK]


def mask_secrets(text: str, values: tuple[str, ...] = ()) -> str:
    """``text`` with URL passwords, the values of secret names (``HF_TOKEN=...``, ``HF_TOKEN: ...``) and
    each of ``values`` (known secrets, 4 characters or more) replaced by ``***``."""
    text = mask_passwords(text)
    text = _NAMED.sub(lambda m: m.group("name") + m.group("sep") + MASK if is_secret_name(m.group("name"))
                      and m.group("value").strip("'\"") != MASK else m.group(0), text)
    for v in sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True):
        text = text.replace(v, MASK)
    return text


def scrub_saved_config(job_dir: Path, values: tuple[str, ...] = ()) -> None:
    """Mask secrets (:func:`mask_secrets`) in the config files Hydra saved for this job
    (``<job dir>/.hydra/*.yaml``)."""
    hydra_dir = Path(job_dir) / ".hydra"
    if not hydra_dir.is_dir():
        return
    for path in hydra_dir.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        masked = mask_secrets(text, values)
        if masked != text:
            path.write_text(masked, encoding="utf-8")


class _MaskFilter(logging.Filter):
    def __init__(self, values: tuple[str, ...]) -> None:
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message, self.values)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def install_log_filter(values: tuple[str, ...] = ()) -> None:
    """Mask secrets in every record that reaches this process's log handlers (console, ``train.log``,
    worker logs); ``values``: known secret values to mask wherever they appear. Idempotent."""
    handlers = [h for logger in (logging.getLogger(), *(logging.getLogger(n) for n in ("sweeper", "hydra")))
                for h in logger.handlers]
    for h in handlers:
        for f in [f for f in h.filters if isinstance(f, _MaskFilter)]:
            h.removeFilter(f)
        h.addFilter(_MaskFilter(tuple(values)))


def secret_values(env_set: dict | None, storage_url: str | None) -> tuple[str, ...]:
    """The secrets a command carries: secret-named ``hydra.job.env_set`` values and the storage password."""
    values = [str(v) for k, v in (env_set or {}).items() if is_secret_name(str(k)) and v is not None]
    if storage_url:
        from urllib.parse import unquote

        for password in _url_passwords(str(storage_url)):
            values += [password, unquote(password)]
    return tuple(values)


def job_secrets() -> tuple[str, ...]:
    """The secrets of the running Hydra job or command (:func:`secret_values` of its ``hydra.job.env_set``
    and ``hydra.sweeper.storage``); () outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except ValueError:
        return ()
    storage = hydra.sweeper.get("storage") if "sweeper" in hydra else None
    return secret_values(dict(hydra.job.get("env_set") or {}), storage)


def split_secret_overrides(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(args without secret env_set overrides, {NAME: value} of those)``: a worker gets them in its
    environment, where the jobs read them, not in its command line."""
    kept, env = [], {}
    for a in args:
        key, sep, value = a.partition("=")
        bare = key.lstrip("+~")
        if sep and bare.startswith("hydra.job.env_set.") and is_secret_name(bare):
            env[bare.rsplit(".", 1)[-1]] = value.strip("'\"")
        else:
            kept.append(a)
    return kept, env


def split_password(url: str) -> tuple[str, str | None]:
    """``(url without its password, the password)`` for a PostgreSQL URL with one, after ``user:`` or as its
    ``?password=`` query parameter; else ``(url, None)`` (other databases take no password from the
    environment)."""
    if not url.startswith("postgresql"):
        return url, None
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    password = parsed.password or parsed.query.get("password")
    if not password:
        return url, None
    if isinstance(password, tuple):  # ?password=a&password=b: libpq takes the last
        password = password[-1]
    # URL.set(password=None) keeps the password (None means "unchanged"); the named tuple's _replace drops it
    bare = parsed._replace(password=None).difference_update_query(["password"])
    return bare.render_as_string(hide_password=False), str(password)
