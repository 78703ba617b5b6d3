"""Where a study lives: a storage URL made into an Optuna storage, and studies loaded, created or deleted by name.

    storage = get_storage("sqlite:///runs/demo/study.db")     # or postgresql://..., None (in memory), an object
    study = load_study("demo", storage)                      # None if there is no such study
    storage_of(study)                                        # the storage object this process opened it with

The URL becomes an SQLAlchemy engine once per process and storage: SQLite in WAL mode with a lock timeout (many
writers wait instead of failing), servers with pooled connections tested before use. Opening a storage creates
Optuna's schema if needed, and survives other processes creating it at the same moment (`schema_race`, retried).
One driver per study holds its lock (`study.lock`; `study.server_lock` on PostgreSQL and MySQL).

Optuna's `Study` exposes no public handle on its storage; the driver needs one to write a trial it holds no live
`Trial` of (a dead driver's RUNNING trial), through the public `BaseStorage` methods. So every study opened here
remembers the storage object it was opened with (`storage_of`), instead of reading Optuna's private attributes.
"""

from __future__ import annotations

import functools
import random
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import StudyError, first_line
from evomerge.storage_url import engine_url, password_hint, redact

Direction = Literal["minimize", "maximize"]  # an objective's, as Optuna spells it

if TYPE_CHECKING:
    import optuna

SQLITE_TIMEOUT_S = 60  # concurrent writers wait for the lock instead of failing
CONNECT_TIMEOUT_S = 5  # a database server that does not answer in this time is out of reach: say so, not hang
SCHEMA_WAIT_S = 120  # how long opening a storage retries while other processes create the same schema
# messages of the errors concurrent schema creation raises (SQLite, PostgreSQL, MySQL), in lower case
_SCHEMA_RACES = (
    "already exists",
    "duplicate key",
    "duplicate entry",
    "database is locked",
    "deadlock detected",
    "could not serialize",
)
_OPENED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()  # study -> the storage it was opened with


def _sqlite_connect(path: str):
    """A sqlite connection that waits for locks, in WAL mode: one commit per trial attribute costs ~1 ms, not an
    fsync."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL survives a killed process; only a power cut may lose the last commit
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def get_storage(storage: Any = None):
    """None -> in-memory; an RDB URL -> RDBStorage (sqlite waits on locks); a storage object -> itself.

    A URL may be redacted (`user:***@`): `storage_url.engine_url` puts the password back, and no message shows it."""
    import optuna

    if storage is None:
        return optuna.storages.InMemoryStorage()
    if not isinstance(storage, str):
        return storage
    url = engine_url(storage)  # the driver is installed, or a StudyError says what to install
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"creator": functools.partial(_sqlite_connect, str(db))}
    else:  # a server may drop idle pooled connections during a long search; test them before use
        kwargs["engine_kwargs"] = {"pool_pre_ping": True, "connect_args": connect_timeout(url)}
    return _open_rdb(storage, url, kwargs)


def connect_timeout(url: str) -> dict[str, Any]:
    """The driver's connect-timeout argument for a server URL (libpq's and the MySQL drivers' `connect_timeout`,
    in seconds), so an unreachable host fails in CONNECT_TIMEOUT_S instead of the operating system's TCP timeout."""
    scheme = url.split("://", 1)[0]
    if scheme.startswith(("postgresql+psycopg", "mysql")) or scheme in ("postgresql", "postgres"):
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def check_reachable(url: str, source: str) -> None:
    """Before any task is built: a database server's URL must answer (one connection, CONNECT_TIMEOUT_S at most),
    else a ConfigError naming the config file and its `storage` field. SQLite files are checked where they open."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from evomerge.errors import ConfigError

    if url.startswith("sqlite:") or "://" not in url:
        return
    real = engine_url(url)  # its driver is installed, or a StudyError says what to install
    engine = create_engine(real, poolclass=NullPool, connect_args=connect_timeout(real))
    try:
        with engine.connect():
            pass
    except Exception as err:  # sqlalchemy raises many kinds for an unreachable server or refused credentials
        raise ConfigError(
            f"{source}: 'storage': {redact(url)!r} cannot be reached ({type(err).__name__}: "
            f"{redact(first_line(err))}){password_hint(url) or '; fix `storage` (or --storage) or start the server'}"
        ) from None
    finally:
        engine.dispose()


def _open_rdb(given: str, url: str, kwargs: dict[str, Any]):
    """RDBStorage(url), retried while other processes create the same schema; a StudyError naming the URL (its
    password hidden) when it cannot be opened."""
    import optuna

    deadline, attempt = time.monotonic() + SCHEMA_WAIT_S, 0
    while True:
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as err:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            if not (schema_race(err) and time.monotonic() < deadline):
                raise StudyError(
                    f"storage {redact(given)!r} cannot be opened ({type(err).__name__}: {redact(first_line(err))})"
                    f"{password_hint(given) or '; fix `storage` or --storage'}"
                ) from None
        # another process is creating the schema right now (a second driver, `evomerge status`, a dashboard): its
        # tables and version rows are there, or soon will be; open them again
        time.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))
        attempt += 1


def schema_race(err: BaseException) -> bool:
    """Whether `err` is what opening a storage raises while another process creates the same schema: Optuna's
    `create_all` (a table created twice), its version rows inserted twice (`alembic_version`, `version_info`),
    or SQLite's writer lock held past its timeout. Nothing else is retried: a bad URL fails at once."""
    from sqlalchemy.exc import IntegrityError

    if isinstance(err, IntegrityError):  # the only rows opening a storage inserts are the schema's version
        return True
    text = str(err).lower()
    return any(s in text for s in _SCHEMA_RACES)


def _remember(study: optuna.Study, storage: Any) -> optuna.Study:
    _OPENED[study] = storage
    return study


def load_study(name: str, storage: Any, sampler=None) -> optuna.Study | None:
    """The study `name` in `storage` (a URL, a storage object or None), or None if it does not exist."""
    import optuna

    storage = get_storage(storage)
    try:
        return _remember(optuna.load_study(study_name=name, storage=storage, sampler=sampler), storage)
    except KeyError:
        return None


def create_study(
    name: str, storage: Any, sampler: optuna.samplers.BaseSampler | None, directions: list[Direction]
) -> optuna.Study:
    """Create the study (or load it, if another process just created it)."""
    import optuna

    storage = get_storage(storage)
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, directions=directions, load_if_exists=True
    )
    return _remember(study, storage)


def delete_study(name: str, storage: Any) -> None:
    import optuna

    optuna.delete_study(study_name=name, storage=get_storage(storage))


def storage_of(study: optuna.Study):
    """The storage object `study` was opened with by this module (StudyError for a study opened elsewhere)."""
    try:
        return _OPENED[study]
    except KeyError:
        raise StudyError(
            f"study {study.study_name!r} was not opened through evomerge.study.storage (load_study, create_study); "
            "open it there to write its trials"
        ) from None


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of trial `number` (public BaseStorage lookups)."""
    storage = storage_of(study)
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


__all__ = [
    "CONNECT_TIMEOUT_S",
    "SCHEMA_WAIT_S",
    "SQLITE_TIMEOUT_S",
    "check_reachable",
    "connect_timeout",
    "create_study",
    "delete_study",
    "get_storage",
    "load_study",
    "schema_race",
    "storage_of",
    "trial_id",
]
