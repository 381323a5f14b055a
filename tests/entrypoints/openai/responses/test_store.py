"""The response store on SQLite and PostgreSQL: tenants, chains, the TTL and count bounds, in-flight
background rows, migrations."""

import time

import pytest
import sqlalchemy as sa

from pagedserve.entrypoints.openai.responses import migrations
from pagedserve.entrypoints.openai.responses.store import (
    ResponseNotFound,
    ResponseStore,
    StoredResponse,
    check_store_url,
    tenant_of,
)

ALICE, BOB = tenant_of("key", None), tenant_of("key", "bob")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/responses.db"
    url = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    with engine.begin() as connection:  # each test starts from an empty database
        connection.execute(sa.text("DROP TABLE IF EXISTS responses, pagedserve_schema"))
    engine.dispose()
    return url


def record(response_id: str, tenant: str = ALICE, previous: str | None = None, created_at: float | None = None,
           status: str = "completed", background: bool = False, owner: str | None = None) -> StoredResponse:
    output = [{"type": "message", "id": f"msg_{response_id}", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": f"answer {response_id}", "annotations": []}]}]
    return StoredResponse(
        response_id, tenant, created_at or time.time(), status, background,
        [{"type": "message", "id": f"in_{response_id}", "role": "user", "content": [{"type": "input_text",
                                                                                      "text": "hi"}]}],
        {"id": response_id, "status": status, "output": output}, previous, "session-1", owner=owner)


def test_tenants_chains_and_delete(url):
    store = ResponseStore(url, ttl_s=3600, max_stored=100)
    store.put(record("a"))
    store.put(record("b", previous="a"))
    store.put(record("c", previous="b"))
    assert [r.id for r in store.chain("c", ALICE)] == ["a", "b", "c"]
    assert store.get("c", ALICE).response["output"][0]["content"][0]["text"] == "answer c"
    assert store.get("c", BOB) is None and not store.delete("c", BOB)  # another tenant: not found
    with pytest.raises(ResponseNotFound):
        store.chain("c", BOB)
    assert store.delete("b", ALICE) and store.get("b", ALICE) is None
    with pytest.raises(ResponseNotFound, match="'b'"):  # a chain with a hole is not rebuilt half
        store.chain("c", ALICE)
    store.close()
    reopened = ResponseStore(url, ttl_s=3600, max_stored=100)  # migrations run again: nothing to do
    assert reopened.get("a", ALICE).id == "a"
    reopened.close()


def test_ttl_and_count_bounds(url):
    store = ResponseStore(url, ttl_s=60, max_stored=3, prune_interval_s=0)
    now = time.time()
    store.put(record("old", created_at=now - 120))
    assert store.get("old", ALICE) is None  # past the TTL: gone at once, pruned at the next write
    for i in range(4):
        store.put(record(f"r{i}", created_at=now + i))
    assert [store.get(f"r{i}", ALICE) is not None for i in range(4)] == [False, True, True, True]
    with store.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM responses")).scalar() == 3
    store.close()


def test_in_flight_background_rows(url):
    store = ResponseStore(url, ttl_s=3600, max_stored=100)
    store.put(record("mine", status="in_progress", background=True, owner="host:1"))
    store.put(record("theirs", status="queued", background=True, owner="host:2"))
    cancelled = record("theirs", status="cancelled", background=True)
    assert store.update_in_flight(cancelled)
    assert not store.update_in_flight(record("theirs", status="completed", background=True))  # cancel wins
    assert store.get("theirs", ALICE).status == "cancelled"
    assert store.fail_in_flight("host:1", "restarted") == 1
    failed = store.get("mine", ALICE)
    assert failed.status == "failed" and failed.response["error"] == {"code": "server_error", "message": "restarted"}
    assert failed.response["status"] == "failed" and failed.owner is None
    store.close()


def test_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/responses.db"
    ResponseStore(url, ttl_s=60, max_stored=10).close()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(migrations.schema_version.update().values(version=len(migrations.MIGRATIONS) + 1))
    engine.dispose()
    with pytest.raises(ValueError, match="newer than this pagedserve"):
        ResponseStore(url, ttl_s=60, max_stored=10)


def test_bad_urls(tmp_path):
    for url, fragment in (("not a url", "database URL"), ("mysql://u@h/db", "sqlite and postgresql"),
                          ("sqlite://", "needs a file"), ("sqlite:///:memory:", "needs a file")):
        with pytest.raises(ValueError, match=fragment):
            check_store_url(url)
    with pytest.raises(ValueError, match="--responses-ttl"):
        ResponseStore(f"sqlite:///{tmp_path}/x.db", ttl_s=0, max_stored=1)
    check_store_url(f"sqlite:///{tmp_path}/sub/dir/x.db")
