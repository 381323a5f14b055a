"""The response store's schema, and the migrations that bring a database to it.

Each migration is applied once, in order, inside one transaction that also records the new version in
`pagedserve_schema`; servers starting together on one PostgreSQL database take an advisory lock first (SQLite
transactions there are BEGIN IMMEDIATE, which serialises them already). A database newer than this code is
refused rather than guessed at. A new migration is appended to MIGRATIONS, never edited in place.
"""

from collections.abc import Callable

import sqlalchemy as sa

metadata = sa.MetaData()

schema_version = sa.Table("pagedserve_schema", metadata, sa.Column("version", sa.Integer, nullable=False))

responses = sa.Table(
    "responses", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),  # a digest of the API key and cache_salt
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("background", sa.Boolean, nullable=False),
    sa.Column("owner", sa.String(300)),  # the server running a background response that is not finished
    sa.Column("previous_response_id", sa.String(64)),
    sa.Column("session_id", sa.String(300)),  # the engine session of the chain
    sa.Column("input_items", sa.JSON, nullable=False),  # this turn's input items
    sa.Column("response", sa.JSON, nullable=False),  # the response object
    sa.Column("events", sa.JSON),  # a background response's stream events, to resume from
    sa.Index("responses_tenant", "tenant"),
    sa.Index("responses_created_at", "created_at"),
    sa.Index("responses_in_flight", "status", "owner"),
)


def _create_responses(connection: sa.Connection) -> None:
    responses.create(connection)


MIGRATIONS: list[Callable[[sa.Connection], None]] = [_create_responses]  # MIGRATIONS[i] brings version i to i + 1

_LOCK_KEY = 0x7061676564  # "paged": the PostgreSQL advisory lock the migrating server holds


def migrate(engine: sa.Engine) -> None:
    """Bring the database to the newest version (creating it if empty)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        schema_version.create(connection, checkfirst=True)
        version = connection.execute(sa.select(schema_version.c.version)).scalar()
        if version is None:
            version = 0
            connection.execute(schema_version.insert().values(version=0))
        if version > len(MIGRATIONS):
            raise ValueError(f"the response store is at schema version {version}, newer than this pagedserve "
                             f"({len(MIGRATIONS)}): upgrade pagedserve or use another --responses-store")
        for migration in MIGRATIONS[version:]:
            migration(connection)
        connection.execute(schema_version.update().values(version=len(MIGRATIONS)))
