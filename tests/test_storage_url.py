"""Storage URLs: the password masked where a URL enters, given back only to connect (no server needed here;
tests/test_postgres.py runs the same against a real PostgreSQL)."""

from __future__ import annotations

import pytest

from evomerge import storage_url as su
from evomerge.config.schema import apply_overrides, parse_config
from evomerge.errors import StudyError


@pytest.fixture(autouse=True)
def _forget():
    su.forget_all()
    yield
    su.forget_all()


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://evomerge:hunter2@db:5432/ev", "postgresql://evomerge:***@db:5432/ev"),
        (
            "postgresql+psycopg://u:p%40ss:word@db/ev?sslmode=require",
            "postgresql+psycopg://u:***@db/ev?sslmode=require",
        ),
        ("postgresql://db/ev?sslmode=require&password=hunter2", "postgresql://db/ev?sslmode=require&password=***"),
        ("mysql+pymysql://root:hunter2@127.0.0.1/ev", "mysql+pymysql://root:***@127.0.0.1/ev"),
        ("postgresql://u@db:5432/ev", "postgresql://u@db:5432/ev"),  # no password: nothing to mask
        ("sqlite:////tmp/x:y@z/study.db", "sqlite:////tmp/x:y@z/study.db"),  # a path, not a password
    ],
)
def test_a_password_is_masked_and_given_back_only_to_connect(url, shown):
    assert su.remember(url) == shown
    assert su.reveal(shown) == url


def test_a_redacted_url_in_a_new_process_takes_the_password_from_the_environment(monkeypatch):
    monkeypatch.delenv(su.PASSWORD_ENV, raising=False)
    shown = "postgresql://evomerge:***@db/ev?password=***&sslmode=require"
    assert su.reveal(shown) == "postgresql://evomerge@db/ev?sslmode=require", "no password: libpq finds one"
    assert su.PASSWORD_ENV in su.password_hint(shown) and "PGPASSWORD" in su.password_hint(shown)
    monkeypatch.setenv(su.PASSWORD_ENV, "p@ss word")
    assert su.reveal(shown) == "postgresql://evomerge:p%40ss%20word@db/ev?password=p%40ss%20word&sslmode=require"
    assert su.password_hint(shown) == ""


def test_configs_hold_only_the_masked_url(tmp_path):
    data = {
        "name": "s",
        "base_model": "base",
        "models": ["a"],
        "method": "task_arithmetic",
        "tasks": {"search": [{"name": "zoo_add_search"}]},
        "storage": "postgresql://u:hunter2@db/ev",
        "sampler": {"name": "cmaes", "warm_start": {"study": "old", "storage": "postgresql://w:hunter3@db/ev"}},
    }
    cfg = parse_config(data, base_dir=tmp_path, check_files=False)
    again = apply_overrides(cfg, storage="postgresql://v:hunter4@db/ev")
    for text in (cfg.to_yaml(), repr(cfg), str(cfg.study_fields()), again.to_yaml(), repr(again)):
        assert "hunter" not in text
    assert (
        again.storage_url == "postgresql://v:***@db/ev"
        and su.reveal(again.storage_url) == "postgresql://v:hunter4@db/ev"
    )
    assert su.reveal(cfg.sampler.warm_start.storage) == "postgresql://w:hunter3@db/ev"
    other = parse_config({**data, "storage": "postgresql://u:changed@db/ev"}, base_dir=tmp_path, check_files=False)
    assert other.study_hash() == cfg.study_hash(), "a new password is the same study"


def test_a_missing_driver_or_an_unknown_dialect_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "psycopg", None)  # as if `evomerge[postgres]` were not installed
    with pytest.raises(
        StudyError, match=r"needs the Python module 'psycopg'.*pip install 'evomerge\[postgres\]'"
    ) as err:
        su.engine_url(su.remember("postgresql://u:hunter2@db/ev"))
    assert "u:***@db" in str(err.value) and "hunter2" not in str(err.value)
    with pytest.raises(StudyError, match="not a database URL SQLAlchemy knows"):
        su.engine_url("nosuchdb://u:hunter2@db/ev")


def test_postgresql_urls_use_psycopg_3_whatever_sqlalchemys_default():
    assert su.engine_url("postgresql://u@db/ev") == "postgresql+psycopg://u@db/ev"
    assert su.engine_url("postgres://u@db/ev") == "postgresql+psycopg://u@db/ev"  # as hosting services write it
    assert su.dialect("postgres://u@db/ev") == "postgresql" and su.dialect("mysql+pymysql://db/ev") == "mysql"
