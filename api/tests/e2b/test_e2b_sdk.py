"""The official `e2b` SDK against `sandbox serve`, unchanged: the server's
URL in E2B_API_URL and E2B_SANDBOX_URL, its key in E2B_API_KEY (set by
api/tests/e2b_sdk.rs, which starts the server and runs this file).

The same flow runs with the sync and the async client."""

import hashlib
import os
import shutil
import subprocess
import time

import httpx
import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.exceptions import NotFoundException, SandboxException

SERVER = os.environ["E2B_API_URL"]
TEN_MIB = 10 * 1024 * 1024
# busybox httpd in the guest, serving one file.
HTTPD = "mkdir -p /srv && echo served-from-the-guest > /srv/index.html && httpd -p 127.0.0.1:{port} -h /srv"


def get_through_host(host: str, path: str = "/index.html") -> httpx.Response:
    """GET http://<host><path> from this host. The host name is
    <port>-<id>.localhost:<server port>, which curl and browsers resolve to
    loopback themselves; Python asks the system resolver, which may not, so
    the request goes to the server's address with that Host header."""
    return httpx.get(f"{SERVER}{path}", headers={"Host": host}, timeout=30)


# ---- sync ----


@pytest.fixture(scope="module")
def sbx():
    sandbox = Sandbox.create(timeout=600)
    yield sandbox
    try:
        sandbox.kill()
    except Exception:
        pass


def test_status_of_a_failing_command_is_in_the_raised_result(sbx):
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo hi; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "hi\n"
    ok = sbx.commands.run("echo out; echo err >&2")
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, "out\n", "err\n")


def test_output_streams_before_the_command_ends(sbx):
    seen = []
    started = time.monotonic()
    result = sbx.commands.run(
        "echo first; sleep 4; echo second",
        on_stdout=lambda line: seen.append((time.monotonic(), line)),
    )
    ended = time.monotonic()
    assert result.exit_code == 0
    assert [line for _, line in seen] == ["first\n", "second\n"]
    # The first line arrived while the command was still sleeping.
    assert seen[0][0] < ended - 3, (started, seen, ended)


def test_a_background_command_is_listed_and_killed(sbx):
    handle = sbx.commands.run("sleep 300", background=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    assert handle.kill()
    with pytest.raises(CommandExitException) as killed:
        handle.wait()
    assert killed.value.exit_code == 137
    assert handle.pid not in [p.pid for p in sbx.commands.list()]


def test_files_of_ten_mib_round_trip(sbx):
    data = os.urandom(TEN_MIB)
    info = sbx.files.write("/tmp/e2b/big.bin", data)
    assert info.path == "/tmp/e2b/big.bin"
    back = sbx.files.read("/tmp/e2b/big.bin", format="bytes")
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
    sbx.files.write("/tmp/e2b/small.txt", "hello")
    assert sbx.files.read("/tmp/e2b/small.txt") == "hello"


def test_files_are_listed_made_moved_and_removed(sbx):
    sbx.files.write("/tmp/list/a.txt", "a")
    assert sbx.files.make_dir("/tmp/list/sub")
    assert not sbx.files.make_dir("/tmp/list/sub")
    entries = {e.name: e for e in sbx.files.list("/tmp/list")}
    assert set(entries) == {"a.txt", "sub"}
    assert entries["a.txt"].type.value == "file" and entries["a.txt"].size == 1
    assert entries["sub"].type.value == "dir"
    sbx.files.rename("/tmp/list/a.txt", "/tmp/list/sub/b.txt")
    assert sbx.files.exists("/tmp/list/sub/b.txt")
    assert not sbx.files.exists("/tmp/list/a.txt")
    sbx.files.remove("/tmp/list")
    assert not sbx.files.exists("/tmp/list")
    with pytest.raises(Exception):
        sbx.files.read("/tmp/list/sub/b.txt")


def test_get_host_reaches_a_server_in_the_guest(sbx):
    sbx.commands.run(HTTPD.format(port=8080))
    host = sbx.get_host(8080)
    assert host.startswith(f"8080-{sbx.sandbox_id}.")
    response = get_through_host(host)
    assert response.status_code == 200
    assert response.text == "served-from-the-guest\n"
    # The URL as it is: curl resolves every *.localhost name to loopback.
    if shutil.which("curl"):
        url = f"http://{host}/index.html"
        curl = subprocess.run(["curl", "-sS", "--max-time", "30", url], capture_output=True, text=True)
        assert (curl.returncode, curl.stdout) == (0, "served-from-the-guest\n"), curl
    # Nothing listens on another port: a clear error, not a hang.
    assert get_through_host(sbx.get_host(8081)).status_code == 502


def test_a_fork_has_the_files_and_its_own_identity(sbx):
    sbx.files.write("/tmp/fork-me.txt", "before the fork")
    copies = sbx.fork(count=2, timeout=300)
    try:
        assert len(copies) == 2 and all(isinstance(c, Sandbox) for c in copies), copies
        ids = {c.sandbox_id for c in copies}
        assert len(ids) == 2 and sbx.sandbox_id not in ids
        for copy in copies:
            assert copy.files.read("/tmp/fork-me.txt") == "before the fork"
            assert copy.commands.run("hostname").stdout == f"{copy.sandbox_id}\n"
        copies[0].files.write("/tmp/fork-me.txt", "changed in one copy")
        assert copies[1].files.read("/tmp/fork-me.txt") == "before the fork"
        assert sbx.files.read("/tmp/fork-me.txt") == "before the fork"
    finally:
        for copy in copies:
            if isinstance(copy, Sandbox):
                copy.kill()


def test_set_timeout_moves_the_end(sbx):
    before = sbx.get_info().end_at
    sbx.set_timeout(900)
    after = sbx.get_info().end_at
    assert (after - before).total_seconds() > 200


def test_a_sandbox_ends_at_its_timeout_and_on_kill():
    short = Sandbox.create(timeout=3)
    assert short.is_running()
    deadline = time.monotonic() + 60
    while short.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]:
        assert time.monotonic() < deadline, "the sandbox outlived its timeout"
        time.sleep(1)
    other = Sandbox.create()
    assert other.commands.run("echo alive").stdout == "alive\n"
    other.kill()
    assert other.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]
    with pytest.raises((NotFoundException, SandboxException)):
        Sandbox.connect(other.sandbox_id)


# ---- async ----


@pytest.mark.asyncio
async def test_the_same_flow_with_the_async_client():
    sandbox = await AsyncSandbox.create(timeout=600)
    try:
        with pytest.raises(CommandExitException) as failed:
            await sandbox.commands.run("echo hi; exit 3")
        assert failed.value.exit_code == 3 and failed.value.stdout == "hi\n"

        seen = []
        await sandbox.commands.run(
            "echo first; sleep 4; echo second",
            on_stdout=lambda line: seen.append((time.monotonic(), line)),
        )
        assert [line for _, line in seen] == ["first\n", "second\n"]
        assert seen[1][0] - seen[0][0] > 3

        handle = await sandbox.commands.run("sleep 300", background=True)
        assert handle.pid in [p.pid for p in await sandbox.commands.list()]
        assert await handle.kill()
        with pytest.raises(CommandExitException):
            await handle.wait()

        data = os.urandom(TEN_MIB)
        await sandbox.files.write("/tmp/async.bin", data)
        back = await sandbox.files.read("/tmp/async.bin", format="bytes")
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
        assert "async.bin" in [e.name for e in await sandbox.files.list("/tmp")]

        await sandbox.commands.run(HTTPD.format(port=8090))
        response = get_through_host(sandbox.get_host(8090))
        assert (response.status_code, response.text) == (200, "served-from-the-guest\n")

        await sandbox.set_timeout(900)
    finally:
        await sandbox.kill()
    assert not await sandbox.is_running()
