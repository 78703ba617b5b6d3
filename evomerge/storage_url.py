"""Storage URLs and their secrets: a database password never leaves the process it was given to.

    evomerge search configs/demo.yaml --storage postgresql://evomerge:PASSWORD@db.example/evomerge

Where a URL enters evomerge (`storage:` and `sampler.warm_start.storage` in a config, `--storage`) its password
(`user:PASSWORD@`, or a `password=` query parameter) becomes `***`: configs, `runs/<name>/config.yaml`, recipe
provenance, the model card, status, the report, logs and error messages only ever hold
`postgresql://evomerge:***@db.example/evomerge`. The real URL stays in this process's memory (`remember`), and
`reveal` hands it to the only two places that connect: `study.storage.get_storage` and the study lock.

A later process that reads a redacted URL from `runs/<name>/config.yaml` (status, export, report, a resume from
the run's config) takes the password from `EVOMERGE_STORAGE_PASSWORD`, or, where that is unset, connects without
one and lets the database client find it (PostgreSQL's libpq: `PGPASSWORD`, `~/.pgpass`, a service file).
SQLAlchemy reads the URL (`make_url`, its own grammar) and renders it with the password hidden; a `password=` query
parameter is masked in the query as given (SQLAlchemy would re-order and re-quote it). The real URL is kept in a
dict of this process rather than on the config, because the config's URL is the one printed and written
everywhere, and only the two places that connect need the secret.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from evomerge.errors import StudyError

MASK = "***"
PASSWORD_ENV = "EVOMERGE_STORAGE_PASSWORD"
_URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"]+")  # where a message quotes a URL (SQLAlchemy parses it)
# The Python module each dialect's default driver needs, and what to install for it.
DRIVERS = {
    "postgresql": ("psycopg", "pip install 'evomerge[postgres]'"),
    "mysql": ("MySQLdb", "pip install mysqlclient (or name another driver: mysql+pymysql://...)"),
}

_known: dict[str, str] = {}  # redacted URL -> the URL as given, for this process only


def redact(text: str) -> str:
    """`text` (a URL, or a message that may quote one) with every password replaced by `***`."""
    if _URL.match(text):  # a URL as given (its password may hold characters a quoted one would not)
        return _redact_url(text)
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def _redact_url(url: str) -> str:
    """One URL with its password (`user:PASSWORD@`, a `password=` query parameter) as `***`; unchanged without."""
    from sqlalchemy.engine.url import make_url

    base, sep, query = url.partition("?")
    items = [f"password={MASK}" if item.startswith("password=") else item for item in query.split("&")] if sep else []
    shown_query = f"?{'&'.join(items)}" if sep else ""
    try:
        parsed = make_url(base)
    except Exception:  # not a URL SQLAlchemy reads: hide everything before the host, to be safe
        scheme, _, rest = base.partition("://")
        return (f"{scheme}://{MASK}@{rest.rpartition('@')[2]}" if "@" in rest else base) + shown_query
    if parsed.password is None:
        return base + shown_query
    return parsed.render_as_string(hide_password=True) + shown_query


def remember(url: str | None) -> str | None:
    """The redacted URL; the real one is kept (in this process) for `reveal`."""
    if url is None:
        return None
    shown = redact(url)
    if shown != url:
        _known[shown] = url
    return shown


def forget_all() -> None:
    """Drop every remembered password (tests; a long-lived process between studies)."""
    _known.clear()


def is_redacted(url: str) -> bool:
    return redact(url) == url and (f":{MASK}@" in url or f"password={MASK}" in url)


def reveal(url: str) -> str:
    """The URL to connect with: the one this process was given, else the mask filled in from
    EVOMERGE_STORAGE_PASSWORD, else the URL without a password (the database client looks for one itself)."""
    if url in _known:
        return _known[url]
    if not is_redacted(url):
        return url
    password = os.environ.get(PASSWORD_ENV)
    secret = quote(password, safe="") if password else None
    base, sep, query = url.partition("?")
    base = base.replace(f":{MASK}@", f":{secret}@" if secret else "@", 1)  # the one `redact` wrote
    items = query.split("&") if sep else []
    items = [f"password={secret}" if p == f"password={MASK}" else p for p in items if secret or p != f"password={MASK}"]
    return f"{base}?{'&'.join(items)}" if items else base


def password_hint(url: str) -> str:
    """What to tell a user whose connection failed, where the password may be the reason ('' where it is not)."""
    if url in _known or not is_redacted(url) or os.environ.get(PASSWORD_ENV):
        return ""
    return (
        f"; run files keep no password: set {PASSWORD_ENV} (PostgreSQL also reads PGPASSWORD and ~/.pgpass), "
        "or give `evomerge search` the URL with its password in --storage"
    )


def dialect(url: str) -> str:
    """`postgresql` for `postgresql+psycopg://...`; `sqlite`, `mysql`, ..."""
    name = url.split("://", 1)[0].split("+", 1)[0].lower()
    return "postgresql" if name == "postgres" else name  # `postgres://` as hosting services write it


def engine_url(url: str) -> str:
    """The URL to hand SQLAlchemy: revealed, `postgresql://` pinned to psycopg 3 (the `postgres` extra; SQLAlchemy
    2.0 would pick psycopg2), and its database driver importable, else a StudyError that says what to install
    (instead of Optuna's "Failed to import DB access module")."""
    real = reveal(url)
    kind = dialect(real)
    if kind == "sqlite":
        return real
    if real.startswith(("postgresql://", "postgres://")):
        real = "postgresql+psycopg://" + real.split("://", 1)[1]
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        dialect_class = make_url(real).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise StudyError(
            f"storage {redact(url)!r} is not a database URL SQLAlchemy knows ({redact(str(err))}); fix `storage` or "
            "--storage"
        ) from None
    try:
        dialect_class.import_dbapi()
    except ImportError as err:
        module, how = DRIVERS.get(kind, (getattr(err, "name", None) or "its driver", "pip install the driver"))
        if "+" in url.split("://", 1)[0]:  # a driver the user named: install that one
            module, how = getattr(err, "name", None) or module, f"pip install the {kind} driver named in the URL"
        raise StudyError(
            f"storage {redact(url)!r} needs the Python module {module!r}, which is not installed: {how}"
        ) from None
    return real


__all__ = [
    "MASK",
    "PASSWORD_ENV",
    "dialect",
    "engine_url",
    "forget_all",
    "is_redacted",
    "password_hint",
    "redact",
    "remember",
    "reveal",
]
