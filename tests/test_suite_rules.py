"""The suite's own rules: a missing real part fails under CI (skips elsewhere); test ports are safe to use."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest
from conftest import free_port, import_real, refused_port, require_real


def outcome(fn, *args) -> str:
    """What `fn(*args)` ends the test with, caught (a skip is not an Exception, so pytest.raises would let it
    end this very test as skipped)."""
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "returned"


@pytest.mark.parametrize("ci", ["true", "1"])
def test_a_missing_real_part_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    got = outcome(require_real, "PostgreSQL", "no initdb")
    assert re.match(r"Failed: PostgreSQL is not available: no initdb\. Under CI a missing real part fails", got), got
    got = outcome(import_real, "no_such_module_xyz", "extra")
    assert re.match(r"Failed: no_such_module_xyz is not available: .*lightning-mlflow-cv\[extra\]", got), got


@pytest.mark.parametrize("ci", [None, "false", ""])
def test_a_missing_real_part_skips_outside_ci(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert outcome(require_real, "PostgreSQL", "no initdb") == "Skipped: PostgreSQL is not available: no initdb"


def test_refused_port_refuses_and_free_port_binds():
    with refused_port() as port, pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    port = free_port()
    assert 1024 < port < 32768  # below the kernel's ephemeral range, where outgoing connections take ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.server
@pytest.mark.slow
def test_server_moves_to_another_port_when_its_chosen_one_was_taken(tmp_path, monkeypatch):
    import conftest

    with socket.socket() as taken:  # someone else took the port between free_port() and the server's bind
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        real_free_port = conftest.free_port
        monkeypatch.setattr(conftest, "free_port", lambda: next(picks, None) or real_free_port())
        server = conftest.MlflowServer(tmp_path)
        assert server.port == busy
        try:
            server.start()
            assert server.port != busy
            with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as r:
                assert r.status == 200
        finally:
            server.stop()


SKIPS = '''
import pytest
from conftest import needs_newer, skip_needs_newer

def test_plain_skip():
    pytest.skip("chromium is missing")

@needs_newer("torch", "99.0", False, "an API from the future")
def test_needs_a_newer_torch():
    pass

def test_needs_a_newer_mlflow_inside():
    skip_needs_newer("mlflow", "99.0", "an API from the future")

@pytest.mark.gpu
def test_gpu_without_one():
    pytest.skip("needs a CUDA GPU; torch sees none")
'''


@pytest.mark.parametrize("ci", ["true", None])
def test_under_ci_only_a_newer_release_or_a_gpu_may_skip(tmp_path, ci):
    """Run a small test file with this conftest: under CI the plain skip fails (naming its reason and the rule), the
    skips for a newer release and the GPU test without a GPU stay skips; outside CI all four skip."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_skips.py").write_text(SKIPS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = ci
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), str(tests.parent), env.get("PYTHONPATH", "")])
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "conftest", "-p", "no:cacheprovider", "--strict-markers",
         "-o", "markers=gpu: needs a GPU", "test_skips.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    if ci:
        assert "1 failed, 3 skipped" in p.stdout, p.stdout[-3000:]
        assert re.search(r"FAILED test_skips\.py::test_plain_skip - skipped under CI: chromium is missing\. Under CI "
                         r"a test may skip only when it needs a newer release", p.stdout), p.stdout[-3000:]
    else:
        assert "4 skipped" in p.stdout, p.stdout[-3000:]
    assert re.search(r"SKIPPED .*needs torch >= 99\.0 \(this is torch \d", p.stdout), p.stdout[-3000:]
