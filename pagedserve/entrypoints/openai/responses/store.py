"""Stored responses, in a real database through SQLAlchemy: a SQLite file by default (under the user's cache
directory, in WAL mode, so a killed server leaves a consistent file), or PostgreSQL (`postgresql://...`,
psycopg 3) for several servers sharing their responses.

Every row belongs to a tenant, a digest of the API key the client sent and its `cache_salt`; every read,
chain and delete is scoped to it, so another tenant's response is simply not found. Rows are bounded by age
(`ttl_s`: older ones are not found at once, and pruned) and count (`max_stored`: the oldest go first; the count
is enforced every `prune_interval_s`, as counting rows is not free). The methods block: the serving layer
calls them on a thread of its own.
"""

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .migrations import migrate, responses

IN_FLIGHT = ("queued", "in_progress")


def tenant_of(api_key: str | None, cache_salt: str | None) -> str:
    """The owner of a stored response: who sent it (API key) and which cache tenant (cache_salt) it is."""
    return hashlib.sha256(f"{api_key or ''}\0{cache_salt or ''}".encode()).hexdigest()


def default_store_url() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return f"sqlite:///{os.path.join(cache, 'pagedserve', 'responses.db')}"


class ResponseNotFound(LookupError):
    """No such response for this tenant (a 404)."""

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(f"Response with id '{response_id}' not found.")
        self.param = param


@dataclass
class StoredResponse:
    id: str
    tenant: str
    created_at: float
    status: str
    background: bool
    input_items: list[dict]
    response: dict  # the response object as clients see it
    previous_response_id: str | None = None
    session_id: str | None = None
    owner: str | None = None  # the server running it, while a background response is in flight
    events: list[dict] | None = None  # a background response's stream events

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in responses.c.keys()}


class ResponseStore:
    def __init__(self, url: str | None, ttl_s: float, max_stored: int, prune_interval_s: float = 10.0) -> None:
        if ttl_s <= 0 or max_stored < 1:
            raise ValueError(f"--responses-ttl must be > 0 and --responses-max-stored >= 1, got {ttl_s}, {max_stored}")
        self.ttl_s = ttl_s
        self.max_stored = max_stored
        self.prune_interval_s = prune_interval_s
        self.pruned_at = 0.0
        self.engine = _open(url or default_store_url())
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def put(self, record: StoredResponse) -> None:
        """Insert, or replace the row of the same id; prune now and then."""
        with self.engine.begin() as connection:
            connection.execute(responses.delete().where(responses.c.id == record.id))
            connection.execute(responses.insert().values(record.row()))
            if time.monotonic() - self.pruned_at >= self.prune_interval_s:
                self._prune(connection)
                self.pruned_at = time.monotonic()

    def update_in_flight(self, record: StoredResponse) -> bool:
        """Write a background response's new state, unless it is no longer in flight (it was cancelled, or
        failed by a restart, meanwhile). Whether it was written."""
        values = record.row()
        del values["id"]
        with self.engine.begin() as connection:
            result = connection.execute(responses.update().where(
                responses.c.id == record.id, responses.c.status.in_(IN_FLIGHT)).values(values))
        return result.rowcount == 1

    def get(self, response_id: str, tenant: str) -> StoredResponse | None:
        with self.engine.begin() as connection:
            return self._get(connection, response_id, tenant)

    def chain(self, response_id: str, tenant: str) -> list[StoredResponse]:
        """The response and the ones it continues, oldest first. ResponseNotFound if it, or a response before it,
        is gone (expired, deleted, another tenant's)."""
        chain: list[StoredResponse] = []
        with self.engine.begin() as connection:
            next_id: str | None = response_id
            while next_id is not None:
                record = self._get(connection, next_id, tenant)
                if record is None:
                    raise ResponseNotFound(next_id, "previous_response_id")
                chain.append(record)
                next_id = record.previous_response_id
        return chain[::-1]

    def delete(self, response_id: str, tenant: str) -> bool:
        with self.engine.begin() as connection:
            result = connection.execute(responses.delete().where(
                responses.c.id == response_id, responses.c.tenant == tenant, self._live()))
        return result.rowcount == 1

    def fail_in_flight(self, owner: str, message: str) -> int:
        """Mark `owner`'s unfinished background responses failed (it stopped, or restarted: nothing runs them)."""
        with self.engine.begin() as connection:
            rows = connection.execute(sa.select(responses.c.id, responses.c.response).where(
                responses.c.status.in_(IN_FLIGHT), responses.c.owner == owner)).all()
            for response_id, response in rows:
                failed = {**response, "status": "failed", "error": {"code": "server_error", "message": message}}
                connection.execute(responses.update().where(responses.c.id == response_id).values(
                    status="failed", owner=None, response=failed))
        return len(rows)

    # ---- internals --------------------------------------------------------------------------------

    def _live(self) -> sa.ColumnElement[bool]:
        return responses.c.created_at >= time.time() - self.ttl_s

    def _get(self, connection: sa.Connection, response_id: str, tenant: str) -> StoredResponse | None:
        row = connection.execute(sa.select(responses).where(
            responses.c.id == response_id, responses.c.tenant == tenant, self._live())).mappings().first()
        return StoredResponse(**row) if row is not None else None

    def _prune(self, connection: sa.Connection) -> None:
        """Drop what is past the TTL, then the oldest rows beyond max_stored."""
        connection.execute(responses.delete().where(responses.c.created_at < time.time() - self.ttl_s))
        beyond = sa.select(responses.c.id).order_by(responses.c.created_at.desc()).offset(self.max_stored)
        connection.execute(responses.delete().where(responses.c.id.in_(beyond.scalar_subquery())))


def check_store_url(url: str) -> None:
    """ValueError unless `url` names a database the store can use (its driver installed); nothing connects."""
    _open(url).dispose()


def _open(url: str) -> sa.Engine:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(f"--responses-store must be a database URL (sqlite:///PATH or postgresql://...), "
                         f"got {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        return _open_sqlite(parsed)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"--responses-store supports sqlite and postgresql URLs, got {parsed.get_backend_name()!r}")
    try:
        return sa.create_engine(parsed, pool_pre_ping=True)
    except ImportError as e:
        raise ValueError(f"--responses-store {parsed.drivername}: its driver is not installed ({e})") from None


def _open_sqlite(url: sa.URL) -> sa.Engine:
    """WAL: readers never wait for the writer, and a commit survives the process being killed at any moment
    (synchronous=NORMAL: a power cut may lose the last commits, never the file's consistency). Transactions
    are BEGIN IMMEDIATE: one writer at a time from the start, so two servers on one file never deadlock
    upgrading a read lock."""
    if not url.database or url.database == ":memory:":
        raise ValueError("--responses-store sqlite needs a file (sqlite:///PATH): an in-memory store is lost on "
                         "restart and not shared between connections")
    os.makedirs(os.path.dirname(os.path.abspath(url.database)), exist_ok=True)
    engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
