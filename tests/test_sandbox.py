"""Tests of the code-execution sandbox. They run real snippets (fork bomb included) with small
limits, so the whole file stays in the seconds range even on 2 cores."""

from __future__ import annotations

import asyncio
import errno
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from maestro_core import sandbox
from maestro_core.errors import ConfigError, SandboxError
from maestro_core.sandbox import SandboxLimits, arun_code, run_code

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux"),
    pytest.mark.timeout(60),
]

IS_ROOT = os.geteuid() == 0


def _sandbox_uid() -> int | None:
    """The uid snippets run as, when it differs from ours (we are root)."""
    if not IS_ROOT:
        return None
    try:
        return pwd.getpwnam(SandboxLimits().user).pw_uid
    except KeyError:
        return None


def _pids_of(uid: int) -> set[int]:
    """Like `pgrep -u UID`, without needing procps."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.add(int(entry))
                        break
        except OSError:
            continue  # exited meanwhile
    return pids


# Tests that run no snippet, so they need no working sandbox on this machine.
NO_SANDBOX_NEEDED: set[str] = set()


def no_sandbox_needed(fn):
    NO_SANDBOX_NEEDED.add(fn.__name__)
    return fn


@pytest.fixture(scope="module")
def sandbox_available() -> None:
    """Skip (with the reason) where this machine cannot isolate at all (e.g. a container
    without CAP_SYS_ADMIN); wherever it can, every test below must pass."""
    try:
        run_code("pass")
    except SandboxError as exc:
        pytest.skip(f"sandbox unavailable here: {exc}")


def _new_pids(uid: int, before: set[int], wait_s: float = 2.0) -> set[int]:
    """Processes of `uid` not in `before`, after giving dying ones `wait_s` to go."""
    deadline = time.monotonic() + wait_s
    while (left := _pids_of(uid) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Fail a test that leaves processes of the sandbox user behind, and kill them (safety net
    so a broken sandbox cannot leave a fork bomb running). Pre-existing ones are ignored; this
    assumes no other program runs snippets as the same user during the test."""
    if request.node.originalname not in NO_SANDBOX_NEEDED:
        request.getfixturevalue("sandbox_available")
    uid = _sandbox_uid()
    before = _pids_of(uid) if uid is not None else set()
    yield
    if uid is None:
        return
    left = _new_pids(uid, before)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"sandbox left processes of uid {uid}: {sorted(left)}"


def run(code: str, **limits) -> sandbox.SandboxResult:
    return run_code(textwrap.dedent(code), SandboxLimits(**limits))


# -- plain results ---------------------------------------------------------------------------

def test_prints_stdout():
    res = run("print('hello', 6 * 7)")
    assert res.stdout == "hello 42\n"
    assert res.stderr == ""
    assert (res.returncode, res.killed_reason, res.timed_out, res.ok) == (0, None, False, True)
    assert 0 < res.duration_s < 5


def test_raising_snippet_gives_exit_code_and_traceback():
    res = run("""
        import sys
        print("before", file=sys.stderr)
        raise ValueError("boom")
    """)
    assert res.returncode == 1 and not res.ok and res.killed_reason is None
    assert res.stderr.startswith("before\n")
    assert "line 4, in <module>" in res.stderr  # the snippet's own line numbers
    assert res.stderr.rstrip().endswith("ValueError: boom")


def test_exit_status_and_syntax_error():
    assert run("import sys; sys.exit(7)").returncode == 7
    res = run("x = (")
    assert res.returncode == 1 and "SyntaxError" in res.stderr


def test_stdin_is_passed():
    res = run_code("a, b = map(int, input().split()); print(a * b)", stdin="6 7\n")
    assert res.stdout == "42\n"


def test_host_packages_importable():
    res = run("import json, math, sympy; print(sympy.factor('x**2 - 1'))", timeout_s=30)
    assert res.ok, res.stderr
    assert res.stdout == "(x - 1)*(x + 1)\n"


# -- limits ----------------------------------------------------------------------------------

def test_busy_loop_stopped_by_cpu_limit():
    res = run("while True: pass", cpu_s=1, timeout_s=10)
    assert res.killed_reason == "cpu"
    assert res.returncode == -signal.SIGXCPU
    assert not res.timed_out and not res.ok
    assert res.duration_s < 5


def test_sleeping_snippet_stopped_by_timeout_keeps_partial_output():
    res = run("""
        import time
        print("started")
        time.sleep(60)
    """, timeout_s=1)
    assert res.timed_out and res.killed_reason == "timeout"
    assert res.returncode == -signal.SIGKILL
    assert res.stdout == "started\n"  # unbuffered: printed before the kill, kept
    assert res.duration_s < 3


def test_unbounded_allocation_stopped_by_memory_limit():
    res = run("""
        chunks = []
        while True:
            chunks.append(bytearray(10 ** 7))
    """, memory_mb=256, timeout_s=10)
    assert res.killed_reason == "memory", res.stderr
    assert res.returncode == 1 and "MemoryError" in res.stderr
    assert res.duration_s < 5


def test_fork_bomb_is_contained():
    uid = _sandbox_uid()
    before = _pids_of(uid) if uid is not None else set()
    start = time.monotonic()
    res = run("import os\nwhile True: os.fork()", max_procs=16, timeout_s=3)
    assert time.monotonic() - start < 6
    assert not res.ok
    # RLIMIT_NPROC made fork fail (not merely the timeout or the output cap stopping it).
    assert "Resource temporarily unavailable" in res.stderr, (res.killed_reason, res.stderr[-500:])
    # The machine is fine: no processes of the sandbox user are left (checked by no_leftovers
    # too, which fails the test otherwise), and a new snippet runs normally.
    if uid is not None:
        assert not _new_pids(uid, before)  # `pgrep -u nobody` finds nothing new
    assert run("print('alive')").stdout == "alive\n"


def test_nproc_limit_counts_processes():
    res = run("""
        import os, time
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
        except OSError as e:
            print(n, e.errno)
    """, max_procs=8, timeout_s=3)
    n, err = map(int, res.stdout.split())
    assert err == errno.EAGAIN
    assert 0 < n <= 8 - 2  # init and the snippet's main process count too
    # The sleeping children died with the snippet (PID namespace), checked by no_leftovers.


def test_children_that_escape_the_process_group_are_killed():
    res = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()  # leaves the process group killpg would reach
            time.sleep(60)
            os._exit(0)
        print("parent done")
    """)
    assert res.ok and res.stdout == "parent done\n"
    # no_leftovers fails the test if the sleeper survived.


def test_output_over_the_limit_is_truncated_and_killed():
    res = run("print('x' * 1_000_000)", max_output_bytes=1000)
    assert res.killed_reason == "output" and not res.ok
    assert res.stdout == "x" * 1000
    endless = run("while True: print('y' * 100)", max_output_bytes=4096, timeout_s=10)
    assert endless.killed_reason == "output" and len(endless.stdout) == 4096
    assert endless.duration_s < 5  # killed on the cap, not on the timeout


def test_file_size_limit():
    res = run("open('big', 'wb').write(b'0' * 100_000)", max_file_bytes=10_000)
    assert res.returncode == 1 and "File too large" in res.stderr


# -- isolation -------------------------------------------------------------------------------

def test_network_is_unreachable_even_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    code = f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            print("connected")
        except OSError as e:
            print("failed", type(e).__name__)
    """
    try:
        res = run(code)
        assert res.stdout.startswith("failed"), res.stdout + res.stderr
        if IS_ROOT:
            # Control: the same snippet with network=True reaches the listener, so the check
            # above would catch a sandbox that leaks the host network.
            assert run(code, network=True).stdout == "connected\n"
    finally:
        server.close()


def test_only_interface_is_loopback_and_down():
    res = run("""
        import fcntl, socket, struct
        print(socket.if_nameindex())
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, req))[1]  # SIOCGIFFLAGS
        print("up" if flags & 1 else "down")
    """)
    assert res.ok, res.stderr
    assert res.stdout == "[(1, 'lo')]\ndown\n"


def test_cannot_read_outside_workdir():
    res = run("""
        import os
        for path in ("/etc/passwd", "/root/.bashrc", "/proc/1/environ"):
            try:
                open(path).read()
                print(path, "READ")
            except OSError as e:
                print(path, type(e).__name__)
        try:
            os.listdir("/root")
            print("/root LISTED")
        except OSError as e:
            print("/root", type(e).__name__)
        print("uid", os.getuid())
    """)
    assert res.ok, res.stderr
    assert "READ" not in res.stdout and "LISTED" not in res.stdout
    assert "/etc/passwd PermissionError" in res.stdout
    assert "/root PermissionError" in res.stdout
    if IS_ROOT:
        assert f"uid {_sandbox_uid()}\n" in res.stdout


@pytest.mark.skipif(not IS_ROOT or not os.path.exists("/etc/shadow"),
                    reason="needs root (drop to nobody) and /etc/shadow")
def test_kernel_refuses_even_when_the_audit_hook_is_bypassed():
    # ctypes calls libc's open directly, which no audit hook sees: only the uid protects.
    res = run("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.open(b"/etc/shadow", 0), ctypes.get_errno())
    """)
    assert res.ok, res.stderr
    assert res.stdout == f"-1 {errno.EACCES}\n"


def test_write_in_workdir_works_and_workdir_is_removed():
    res = run("""
        import os, tempfile
        with open("notes.txt", "w") as f:
            f.write("kept")
        os.mkdir("sub")
        with tempfile.NamedTemporaryFile(dir=None, delete=False) as t:
            t.write(b"tmp")
        print(open("notes.txt").read(), os.getcwd(), os.environ["HOME"] == os.getcwd(),
              os.path.dirname(t.name) == os.getcwd())
    """)
    assert res.ok, res.stderr
    content, cwd, home_ok, tmp_ok = res.stdout.split()
    assert (content, home_ok, tmp_ok) == ("kept", "True", "True")
    assert "maestro-sandbox-" in cwd
    assert not os.path.exists(cwd)


def test_cannot_write_outside_workdir():
    res = run("""
        for path in ("/tmp/maestro-sandbox-escape.txt", "../escape.txt"):
            try:
                open(path, "w").write("x")
                print("WROTE", path)
            except OSError as e:
                print(type(e).__name__)
    """)
    assert res.stdout == "PermissionError\nPermissionError\n", res.stderr
    assert not os.path.exists("/tmp/maestro-sandbox-escape.txt")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("MAESTRO_API_KEY", "secret-xyz")
    res = run("""
        import os
        print(sorted(os.environ))
        print(os.environ.get("MAESTRO_API_KEY"))
    """)
    assert res.ok, res.stderr
    assert "secret-xyz" not in res.stdout
    names = eval(res.stdout.splitlines()[0])
    assert "MAESTRO_API_KEY" not in names
    assert set(names) <= {"PATH", "HOME", "TMPDIR", "LANG", "PYTHONDONTWRITEBYTECODE",
                          "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"}


def test_subprocess_blocked_unless_allowed():
    code = """
        import subprocess
        try:
            print(subprocess.run(["echo", "ran"], capture_output=True, text=True).stdout, end="")
        except PermissionError as e:
            print("blocked")
    """
    assert run(code).stdout == "blocked\n"
    assert run(code, allow_subprocess=True).stdout == "ran\n"


# -- asyncio ---------------------------------------------------------------------------------

async def test_arun_code():
    results = await asyncio.gather(arun_code("print(1)"), arun_code("print(2)"))
    assert [r.stdout for r in results] == ["1\n", "2\n"]


async def test_arun_code_cancel_kills_the_snippet():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "maestro-sandbox-*")))
    task = asyncio.ensure_future(arun_code("import time; time.sleep(60)",
                                           SandboxLimits(timeout_s=30)))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if set(glob.glob(os.path.join(tempfile.gettempdir(), "maestro-sandbox-*"))) <= before:
            break
        await asyncio.sleep(0.05)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "maestro-sandbox-*"))) <= before
    # no_leftovers checks the sleeper was killed.


# -- set-up errors ---------------------------------------------------------------------------

@no_sandbox_needed
def test_invalid_limits_are_config_errors():
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


@pytest.mark.skipif(not IS_ROOT, reason="the user is only used when running as root")
@no_sandbox_needed
def test_missing_user_is_a_sandbox_error():
    with pytest.raises(SandboxError, match="does not exist"):
        run_code("pass", SandboxLimits(user="no-such-user-maestro"))


@no_sandbox_needed
def test_non_root_without_user_namespaces_refuses_to_run(monkeypatch):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_userns_works", lambda unshare: "Operation not permitted")
    with pytest.raises(SandboxError, match="user namespaces"):
        run_code("print(1)")
    # network=True alone, or allow_unisolated alone, is not enough to run unisolated.
    with pytest.raises(SandboxError):
        run_code("print(1)", SandboxLimits(allow_unisolated=True))
    with pytest.raises(SandboxError):
        run_code("print(1)", SandboxLimits(network=True))


@pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None,
                    reason="needs root to become an unprivileged caller")
def test_non_root_caller_uses_a_user_namespace():
    # Run the sandbox from an unprivileged caller (nobody): it must fall back to
    # `unshare --user`. The package is copied where nobody can read it.
    uid = _sandbox_uid()
    if uid is None:
        pytest.skip("no sandbox user")
    interp = sandbox._interpreter(sandbox._isolation(SandboxLimits()).as_user, False).path
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, nobody could not reach it.
    tmp_path = Path(tempfile.mkdtemp(prefix="maestro-sandbox-test-"))
    try:
        _run_as_unprivileged_caller(tmp_path, uid, interp)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _run_as_unprivileged_caller(tmp_path: Path, uid: int, interp: str) -> None:
    pkg = tmp_path / "maestro_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = Path(sandbox.__file__).parent
    for name in ("errors.py", "sandbox.py"):
        shutil.copy(src / name, pkg / name)
    driver = textwrap.dedent("""
        import json, sys
        sys.path.insert(0, sys.argv[1])
        from maestro_core.sandbox import SandboxLimits, run_code
        r = run_code("import os, socket; print(os.getpid(), socket.if_nameindex())",
                     SandboxLimits(host_packages=False))
        print(json.dumps([r.returncode, r.stdout, r.stderr]))
    """)
    os.chmod(tmp_path, 0o755)
    for p in [tmp_path, *tmp_path.rglob("*")]:
        os.chown(p, uid, -1)
    gid = pwd.getpwuid(uid).pw_gid
    proc = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
         interp, "-I", "-c", driver, str(tmp_path)],
        capture_output=True, text=True, timeout=30, cwd="/", env={"PATH": "/usr/bin:/bin"})
    if proc.returncode != 0 and "user namespaces" in proc.stderr:
        pytest.skip("unprivileged user namespaces are not permitted on this machine")
    assert proc.returncode == 0, proc.stderr
    rc, out, err = json.loads(proc.stdout)
    assert rc == 0, err
    assert out == "2 [(1, 'lo')]\n"  # own PID namespace (init is 1), own network namespace
