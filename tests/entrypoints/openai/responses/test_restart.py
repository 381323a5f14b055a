"""The store outlives its server: killed with SIGKILL while it writes, a server's SQLite file is intact, every
response it acknowledged is there, chains go on from the restarted server at the same address, and the
background response the killed one was running is failed with a clear error; a server that stops marks its
unfinished background responses failed too."""

import sqlite3
import subprocess
import sys
import threading
import time

import openai
import pytest
import sqlalchemy as sa
from server_utils import ServerProcess, free_port

SIZES = ("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "256")


def wait_for(client, response_id: str, status: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (response := client.responses.retrieve(response_id)).status != status:
        assert time.monotonic() < deadline, f"{response_id} is {response.status}, not {status}"
        time.sleep(0.05)
    return response


def test_kill_restart_and_stop(llama_dir, tmp_path):
    path = tmp_path / "responses.db"
    port = free_port()
    flags = ("--engine-placement", "thread", "--responses-store", f"sqlite:///{path}")
    server = ServerProcess(llama_dir, *flags, sizes=SIZES, port=port)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
    model = client.models.list().data[0].id
    first = client.responses.create(model=model, input="Hello", max_output_tokens=2)
    second = client.responses.create(model=model, input="Again", previous_response_id=first.id, max_output_tokens=2)
    running = client.responses.create(model=model, input="A long story", background=True, max_output_tokens=900,
                                      extra_body={"ignore_eos": True})
    wait_for(client, running.id, "in_progress")

    acknowledged: list[str] = []

    def write() -> None:  # stored responses, one after another, until the server dies under them
        try:
            while True:
                acknowledged.append(client.responses.create(model=model, input="x", max_output_tokens=1).id)
        except openai.APIConnectionError:
            return

    writer = threading.Thread(target=write)
    writer.start()
    while len(acknowledged) < 5:
        time.sleep(0.05)
    server.proc.kill()  # SIGKILL, mid-write
    server.proc.wait()
    writer.join(timeout=30)
    server.log.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    server = ServerProcess(llama_dir, *flags, "--responses-ttl", "3600", "--responses-max-stored", "4", sizes=SIZES,
                           port=port)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        assert all(client.responses.retrieve(response_id).status == "incomplete" for response_id in acknowledged)
        failed = client.responses.retrieve(running.id)
        assert failed.status == "failed" and "restarted" in failed.error.message
        third = client.responses.create(model=model, input="And now?", previous_response_id=second.id,
                                        max_output_tokens=2)
        assert third.usage.input_tokens > second.usage.input_tokens  # the history came from the file
        with pytest.raises(openai.NotFoundError):  # past --responses-max-stored: the oldest went
            client.responses.retrieve(first.id)

        stopped = client.responses.create(model=model, input="Another story", background=True,
                                          max_output_tokens=900, extra_body={"ignore_eos": True})
        wait_for(client, stopped.id, "in_progress")
    finally:
        assert server.stop() == 0
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.connect() as connection:
        status, response = connection.execute(sa.text("SELECT status, response FROM responses WHERE id = :id"),
                                              {"id": stopped.id}).one()
    engine.dispose()
    assert status == "failed" and "stopped" in response


def test_a_bad_store_url_fails_start_up_in_one_line(llama_dir):
    result = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", llama_dir, "--port",
                             str(free_port()), "--responses-store", "mysql://user@host/db"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --responses-store supports sqlite and postgresql URLs, got 'mysql'"]
