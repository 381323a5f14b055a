"""A PostgreSQL server for the store tests (when its binaries are on this machine), and the tests' access to
../server_utils.py."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # server_utils

from server_utils import ServerProcess, free_port  # noqa: E402


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb in a temporary directory, on a free port), as a store URL."""
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    root = tempfile.mkdtemp(prefix="pagedserve-pg-")
    os.chmod(root, 0o777)
    data, port = os.path.join(root, "data"), free_port()
    subprocess.run([*as_user, "initdb", "-D", data, "-U", "pagedserve", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*as_user, "pg_ctl", "-D", data, "-w", "-l", os.path.join(root, "log"), "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://pagedserve@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def responses_server(llama_dir):
    """One server for the /v1/responses tests (tiny random checkpoint, hermes tool parser, a store of its own)."""
    proc = ServerProcess(llama_dir, "--engine-placement", "thread", "--enable-auto-tool-choice", "--tool-call-parser",
                         "hermes", "--enable-prompt-tokens-details",
                         sizes=("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "512"))
    yield proc
    assert proc.stop() == 0
