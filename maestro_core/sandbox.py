"""Code-execution sandbox: run a Python snippet written by a model, with limits, and get back
what it printed.

    from maestro_core.sandbox import SandboxLimits, run_code, arun_code

    res = run_code("print(sum(range(10)))")
    res.ok, res.stdout, res.stderr, res.returncode, res.killed_reason
    res = await arun_code(code, SandboxLimits(timeout_s=2, memory_mb=256), stdin="3 4\\n")

A failing snippet is a *result* (`ok` is False, `returncode`, `stderr` and `killed_reason` say
why). `SandboxError` is raised only when the sandbox itself cannot be set up (missing user, no
namespaces, no interpreter the sandbox user can run).

How one run is isolated (Linux only):

1. A throwaway working directory (`tempfile.mkdtemp`), owned by the sandbox user, mode 0700,
   holding the snippet as `main.py`; it is the snippet's cwd, HOME and TMPDIR, and is removed
   afterwards.
2. `unshare --net --pid --fork --kill-child --mount --mount-proc`: a new network namespace
   (only a loopback interface, which is down: nothing, not even the host's 127.0.0.1, can be
   reached), a new PID namespace (the snippet cannot see or signal host processes; when its
   init exits, the kernel kills every process left in it, including ones that escaped the
   process group with setsid) and a private /proc. Done while still root (or, for a
   non-root caller, inside a new user namespace: `unshare --user --map-root-user`).
3. `setpriv --reuid --regid --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all`:
   the snippet runs as an unprivileged user (`nobody` by default) with no capabilities and no
   way to regain any (setuid binaries do nothing under no_new_privs). This is what makes
   RLIMIT_NPROC bite: the kernel does not apply it to root.
4. `python -I -B -u`: isolated mode (no PYTHON* variables, no user site, no cwd on sys.path),
   no bytecode files, unbuffered output (what was printed before a kill is kept).
5. A scrubbed environment: only PATH, HOME, TMPDIR, LANG, PYTHONDONTWRITEBYTECODE and the
   BLAS/OpenMP thread counts; nothing inherited, so API keys in the parent's environment
   never reach the snippet.
6. A bootstrap (`_BOOTSTRAP`) that sets the resource limits (RLIMIT_NPROC, RLIMIT_AS,
   RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0), then forks: the parent stays as
   the namespace's init (PID 1 ignores default-action signals, so the snippet must not be
   PID 1) and reports the snippet's exit status and CPU time on a private pipe; the child
   installs an audit hook (`sys.addaudithook`) and runs the snippet.
7. The audit hook, defence in depth only: it refuses `open`/listdir/... of paths outside the
   working directory (reading the interpreter's stdlib and site paths, a few public files
   and /dev/null, /dev/urandom... is allowed), socket connect/bind/sendto unless
   `network=True`, and subprocess/exec/spawn/system unless `allow_subprocess=True`.
   `os.fork` is left to RLIMIT_NPROC so fork bombs meet the real kernel limit.
8. The run is its own session and process group. On timeout, on too much output or on
   cancellation the namespace's init is killed (the kernel then kills everything inside and
   unshare reaps init, so no zombie is orphaned onto the host's PID 1), and in every case the
   whole group finally gets SIGKILL (`os.killpg`) as a sweep.

A non-root caller (a developer's laptop) gets the same steps inside a user namespace, but
the snippet keeps the caller's uid (no other uid is mapped): at kernel level it can read what
the caller can, so only the audit hook stands between it and the caller's home directory.
Without user namespaces it raises SandboxError, unless `network=True` and
`allow_unisolated=True` both ask to run with rlimits, env scrubbing and the hook only.

What the audit hook is not: a security boundary. CPython's audit hooks can be bypassed by
code that tries (ctypes, `_posixsubprocess.fork_exec`, monkeypatching `os.path`, `os.open`
with `dir_fd`). The kernel layers (unprivileged uid, namespaces, rlimits) are the boundary;
the hook keeps honest-but-sloppy model code away from files like /etc/passwd and makes the
failure explicit. Files readable by every user stay readable for a determined snippet.

The interpreter: the sandbox user must be able to run it. A virtualenv whose base Python
lives under /root (pyenv; /root is mode 0700) is not usable by `nobody`, so the candidates
are probed as that user and the first one that works is used (typically /usr/bin/python3);
the host environment's site-packages are appended to its sys.path (read-only, no .pth
processing) when its major.minor version matches, so numpy and sympy can still be imported.

Limits worth knowing: RLIMIT_NPROC counts every process and thread of the sandbox uid on the
machine, so concurrent runs as the same user share `max_procs`; RLIMIT_AS counts address
space, not resident memory, so thread-heavy libraries need more than their RSS.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import pwd
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO

from maestro_core.errors import ConfigError, SandboxError

log = logging.getLogger(__name__)

__all__ = ["SandboxLimits", "SandboxResult", "run_code", "arun_code"]


@dataclass(frozen=True)
class SandboxLimits:
    """What one snippet may use. Every field has a `help` entry in its metadata."""

    timeout_s: float = field(default=5.0, metadata={
        "help": "Wall-clock limit in seconds; then the whole process group is killed "
                "(killed_reason 'timeout')."})
    cpu_s: int = field(default=5, metadata={
        "help": "CPU-time limit in seconds per process (RLIMIT_CPU); SIGXCPU at the limit, "
                "SIGKILL one second later (killed_reason 'cpu')."})
    memory_mb: int = field(default=512, metadata={
        "help": "Address-space limit in MiB per process (RLIMIT_AS); allocations beyond it "
                "raise MemoryError (killed_reason 'memory')."})
    max_procs: int = field(default=32, metadata={
        "help": "Processes and threads the sandbox user may have (RLIMIT_NPROC), counting "
                "the sandbox's own init process; stops fork bombs."})
    max_output_bytes: int = field(default=64 * 1024, metadata={
        "help": "Bytes kept of stdout and of stderr each; more and the run is killed "
                "(killed_reason 'output')."})
    max_file_bytes: int = field(default=16 * 1024 * 1024, metadata={
        "help": "Largest file the snippet may write (RLIMIT_FSIZE); writes beyond it fail "
                "with EFBIG."})
    user: str = field(default="nobody", metadata={
        "help": "Unprivileged user the snippet runs as when the caller is root. Ignored for "
                "a non-root caller (it runs as itself inside a user namespace)."})
    network: bool = field(default=False, metadata={
        "help": "Allow network access: keep the host's network namespace and let sockets "
                "connect. Off by default."})
    allow_subprocess: bool = field(default=False, metadata={
        "help": "Let the snippet start programs (subprocess, os.system, os.exec*, "
                "posix_spawn). os.fork is always subject to max_procs only."})
    host_packages: bool = field(default=True, metadata={
        "help": "Make the host environment's site-packages importable (read-only) when the "
                "sandbox interpreter has the same major.minor version."})
    allow_unisolated: bool = field(default=False, metadata={
        "help": "When namespaces are unavailable (non-root caller, user namespaces "
                "forbidden), run anyway with rlimits and the audit hook only. Honoured only "
                "together with network=True, since without a namespace there is no way to "
                "cut the network."})

    def __post_init__(self) -> None:
        positive = ("timeout_s", "cpu_s", "max_procs", "max_output_bytes", "max_file_bytes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"must be a positive number, got {value!r}.",
                                  source="SandboxLimits", field=name, fix="use a value > 0.")
        # Below ~32 MiB of address space the interpreter cannot even import its stdlib.
        if not isinstance(self.memory_mb, int) or self.memory_mb < 32:
            raise ConfigError(f"must be an integer >= 32, got {self.memory_mb!r}.",
                              source="SandboxLimits", field="memory_mb",
                              fix="give the interpreter at least 32 MiB.")
        # The sandbox's init process counts against RLIMIT_NPROC too.
        if self.max_procs < 2:
            raise ConfigError(f"must be >= 2 (init + snippet), got {self.max_procs!r}.",
                              source="SandboxLimits", field="max_procs", fix="use 2 or more.")


@dataclass(frozen=True)
class SandboxResult:
    """What a snippet did. `returncode` is negative (-N) when it died from signal N."""

    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    killed_reason: str | None
    """None, or why it was stopped: 'timeout', 'cpu', 'memory', 'output' or 'signal N'."""
    duration_s: float

    @property
    def ok(self) -> bool:
        """True when the snippet exited with status 0 and was not stopped."""
        return self.returncode == 0 and self.killed_reason is None


# --------------------------------------------------------------------------------------------
# The program run inside the sandbox. It is passed with `-c`, so it needs no file the sandbox
# user would have to read; its configuration comes as one JSON argument.
_BOOTSTRAP = r'''
import json, os, resource, sys

_cfg = json.loads(sys.argv[1])
_status = _cfg["status_fd"]


def _report(obj):
    os.write(_status, (json.dumps(obj) + "\n").encode())


_report({"started": True})
for _name, _value in _cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), tuple(_value))

try:
    _child = os.fork()
except OSError as _exc:
    _report({"error": "could not fork the snippet process: %s" % (_exc,)})
    os._exit(125)

if _child:
    # Init of the PID namespace: reap everything (orphans are re-parented to us) until the
    # snippet's main process ends, then report how it ended. Exiting makes the kernel kill
    # whatever the snippet left behind.
    while True:
        _pid, _st, _ru = os.wait4(-1, 0)
        if _pid == _child:
            break
    _rep = {"cpu_s": _ru.ru_utime + _ru.ru_stime}
    if os.WIFSIGNALED(_st):
        _rep["signal"] = os.WTERMSIG(_st)
        _code = 128 + _rep["signal"]
    else:
        _rep["exit"] = os.waitstatus_to_exitcode(_st)
        _code = _rep["exit"] & 0xFF
    _report(_rep)
    os._exit(_code)

# ---- the snippet's process -----------------------------------------------------------------
os.close(_status)  # the status pipe belongs to init: the snippet cannot forge its report
import builtins, errno, traceback, types

_wd = os.path.realpath(_cfg["workdir"])
_main = os.path.join(_wd, "main.py")
with open(_main, encoding="utf-8") as _f:
    _src = _f.read()
for _p in _cfg["extra_path"]:
    if _p not in sys.path:
        sys.path.append(_p)

_roots = set()
for _p in [*sys.path, os.path.dirname(os.__file__), *_cfg["read_roots"]]:
    if _p and isinstance(_p, str):
        _r = os.path.realpath(_p)
        if _r != "/":
            _roots.add(_r)
_roots = tuple(sorted(_roots))
_DEVICES = frozenset(("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/stdin",
                      "/dev/stdout", "/dev/stderr", "/dev/fd/0", "/dev/fd/1", "/dev/fd/2"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# event -> ((index of a path argument, "r" or "w", index of its dir_fd argument or None), ...)
_PATH_EVENTS = {
    "os.listdir": ((0, "r", None),), "os.scandir": ((0, "r", None),),
    "os.chdir": ((0, "r", None),), "os.listxattr": ((0, "r", None),),
    "os.getxattr": ((0, "r", None),), "os.setxattr": ((0, "w", None),),
    "os.removexattr": ((0, "w", None),), "os.truncate": ((0, "w", None),),
    "os.mkdir": ((0, "w", 2),), "os.rmdir": ((0, "w", 1),), "os.remove": ((0, "w", 1),),
    "os.rename": ((0, "w", 2), (1, "w", 3)), "os.link": ((0, "r", 2), (1, "w", 3)),
    "os.symlink": ((1, "w", 2),), "os.chmod": ((0, "w", 2),), "os.chown": ((0, "w", 3),),
    "os.utime": ((0, "w", 3),), "shutil.rmtree": ((0, "w", 1),),
    "shutil.copyfile": ((0, "r", None), (1, "w", None)),
    "shutil.copymode": ((0, "r", None), (1, "w", None)),
    "shutil.copystat": ((0, "r", None), (1, "w", None)),
    "shutil.copytree": ((0, "r", None), (1, "w", None)),
    "shutil.move": ((0, "w", None), (1, "w", None)),
}
_NET_EVENTS = frozenset(("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"))
_PROC_EVENTS = frozenset(("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                          "os.spawn", "os.startfile"))


# Everything the hook uses is bound as a default argument, so a snippet that rebinds
# os.path.realpath & co. afterwards does not change what the hook calls.
def _maestro_audit_hook(event, args, _wd=_wd, _roots=_roots, _devices=_DEVICES,
                        _path_events=_PATH_EVENTS, _net_events=_NET_EVENTS,
                        _proc_events=_PROC_EVENTS, _net=bool(_cfg["network"]),
                        _sub=bool(_cfg["allow_subprocess"]), _wflags=_WRITE_FLAGS,
                        _fsdecode=os.fsdecode, _realpath=os.path.realpath,
                        _normpath=os.path.normpath, _join=os.path.join, _getcwd=os.getcwd,
                        _readlink=os.readlink, _EACCES=errno.EACCES, _PE=PermissionError):
    if event == "open":
        mode, flags = args[1], args[2]
        writes = ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                  or (isinstance(flags, int) and flags & _wflags))
        checks = ((args[0], "w" if writes else "r", None),)
    elif event in _path_events:
        checks = tuple((args[i], mode, args[d] if d is not None and d < len(args) else None)
                       for i, mode, d in _path_events[event] if i < len(args))
    elif event in _net_events:
        if not _net:
            raise _PE(_EACCES, "sandbox: network access is disabled (%s)" % event)
        return
    elif event in _proc_events:
        if not _sub:
            raise _PE(_EACCES, "sandbox: starting programs is disabled (%s)" % event)
        return
    elif event == "object.__setattr__":
        if getattr(args[0], "__name__", None) == "_maestro_audit_hook":
            raise _PE(_EACCES, "sandbox: the audit hook cannot be changed")
        return
    else:
        return
    for path, mode, dir_fd in checks:
        if path is None or isinstance(path, int):
            continue  # an open file descriptor was checked when it was opened
        path = _fsdecode(path)
        base = _getcwd()
        if isinstance(dir_fd, int) and dir_fd >= 0:
            base = _readlink("/proc/self/fd/%d" % dir_fd)
        plain = _normpath(_join(base, path))
        if plain in _devices:
            continue
        real = _realpath(plain)
        if real == _wd or real.startswith(_wd + "/"):
            continue
        if mode == "r" and any(real == r or real.startswith(r + "/") for r in _roots):
            continue
        what = "writing" if mode == "w" else "reading"
        raise _PE(_EACCES, "sandbox: %s outside the working directory is not allowed" % what, path)


sys.addaudithook(_maestro_audit_hook)

# A fresh __main__ so the snippet does not see (or clobber) the bootstrap's names.
_mod = types.ModuleType("__main__")
_mod.__file__ = _main
_mod.__builtins__ = builtins
sys.modules["__main__"] = _mod
sys.argv = [_main]
try:
    exec(compile(_src, _main, "exec"), _mod.__dict__)
except SystemExit:
    raise
except BaseException as _e:
    _tb = _e.__traceback__.tb_next  # drop the bootstrap's own frame
    if isinstance(_e, MemoryError):
        # Free what the snippet holds first, or printing the traceback fails for lack of memory.
        traceback.clear_frames(_tb)
        _mod.__dict__.clear()
    traceback.print_exception(type(_e), _e, _tb)
    sys.stderr.flush()
    sys.exit(1)
'''

# Probe run as the sandbox user: can it really use this interpreter (not just exec it), and
# which of the host's package directories can it read?
_PROBE = r'''
import json, os, sys
exe = os.path.realpath(sys.executable)
ok = os.access(exe, os.X_OK) and os.access(os.__file__, os.R_OK)
readable = [p for p in sys.argv[1:] if os.access(p, os.R_OK | os.X_OK)]
print(json.dumps({"ok": ok, "version": list(sys.version_info[:2]), "readable": readable}))
'''

_ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
# Public, read-only system data some stdlib modules read (zoneinfo, mimetypes).
_EXTRA_READ_ROOTS = ("/usr/share/zoneinfo", "/etc/localtime", "/etc/mime.types")
_DROP_PRIVS = ("--no-new-privs", "--inh-caps=-all", "--bounding-set=-all")
_MEMORY_ERROR_RE = re.compile(r"^(?:[\w.]+\.)?\w*MemoryError\b")


@dataclass(frozen=True)
class _Interpreter:
    path: str
    extra_path: tuple[str, ...]


@dataclass(frozen=True)
class _Isolation:
    prefix: tuple[str, ...]
    """Command words placed before the interpreter (unshare ... setpriv ...)."""
    as_user: tuple[str, ...]
    """setpriv words that only switch to the sandbox user (for probes), or ()."""
    uid: int | None
    gid: int | None
    """Owner to give the working directory; None when we already are that user."""


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if not path:
        raise SandboxError(f"'{name}' was not found; the sandbox needs it. "
                           "Fix: install util-linux (apt-get install util-linux).")
    return path


def _namespace_flags(limits: SandboxLimits) -> list[str]:
    flags = [] if limits.network else ["--net"]
    return flags + ["--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@functools.lru_cache(maxsize=None)
def _userns_works(unshare: str) -> str | None:
    """None when an unprivileged user namespace (with net/pid/mount) can be made, else why not."""
    cmd = [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
           "--mount", "--mount-proc", "--", "true"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15,
                              env={"PATH": _ENV_PATH}, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


def _isolation(limits: SandboxLimits) -> _Isolation:
    if not sys.platform.startswith("linux"):
        raise SandboxError("the sandbox needs Linux namespaces; this is " + sys.platform + ".")
    unshare, setpriv = _tool("unshare"), _tool("setpriv")
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(limits.user)
        except KeyError:
            raise SandboxError(
                f"sandbox user '{limits.user}' does not exist. Fix: create it "
                f"(useradd --system --no-create-home {limits.user}) or set "
                "SandboxLimits(user=...) to an existing unprivileged user.") from None
        if entry.pw_uid == 0:
            raise SandboxError(f"sandbox user '{limits.user}' is root, which defeats the sandbox "
                               "(and RLIMIT_NPROC). Fix: use an unprivileged user such as nobody.")
        as_user = (setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups")
        # unshare first, while still root; setpriv drops to the user inside the namespaces.
        prefix = (unshare, *_namespace_flags(limits), "--", *as_user, *_DROP_PRIVS, "--")
        return _Isolation(prefix, as_user, entry.pw_uid, entry.pw_gid)
    why = _userns_works(unshare)
    if why is None:
        prefix = (unshare, "--user", "--map-root-user", *_namespace_flags(limits), "--",
                  setpriv, *_DROP_PRIVS, "--")
        return _Isolation(prefix, (), None, None)
    if limits.allow_unisolated and limits.network:
        log.warning("sandbox: running WITHOUT namespaces (allow_unisolated=True): %s", why)
        return _Isolation((), (), None, None)
    raise SandboxError(
        "cannot isolate the snippet: not running as root and unprivileged user namespaces are "
        f"not permitted here ({why}). Fix: run as root, or allow user namespaces "
        "(sysctl kernel.unprivileged_userns_clone=1, or "
        "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), or, only if the snippet may "
        "use the network, pass SandboxLimits(network=True, allow_unisolated=True).")


def _host_package_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(p for p in (paths.get("purelib"), paths.get("platlib")) if p))


@functools.lru_cache(maxsize=None)
def _interpreter(as_user: tuple[str, ...], host_packages: bool) -> _Interpreter:
    """The first interpreter the sandbox user can really run, preferring the host's version."""
    candidates = [sys.executable, os.path.realpath(sys.executable),
                  getattr(sys, "_base_executable", ""), shutil.which("python3", path=_ENV_PATH),
                  "/usr/bin/python3", "/usr/local/bin/python3"]
    host_dirs = _host_package_dirs() if host_packages else []
    usable: list[tuple[str, list[int], list[str]]] = []
    failures: list[str] = []
    for cand in dict.fromkeys(c for c in candidates if c):
        if not os.path.isfile(cand):
            continue
        cmd = [*as_user, "--", cand, "-I", "-c", _PROBE, *host_dirs] if as_user else \
              [cand, "-I", "-c", _PROBE, *host_dirs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd="/",
                                  env={"PATH": _ENV_PATH, "LANG": "C.UTF-8"})
            info = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
            failures.append(f"{cand}: {exc}")
            continue
        if not info or not info["ok"]:
            why = (proc.stderr.strip().splitlines() or ["a parent directory is not traversable"])
            failures.append(f"{cand}: not usable by the sandbox user ({why[-1]})")
            continue
        usable.append((cand, info["version"], info["readable"]))
        if info["version"] == list(sys.version_info[:2]):
            break
    if not usable:
        raise SandboxError(
            "no Python interpreter is usable by the sandbox user: " + "; ".join(failures)
            + ". Fix: install a system python3 (apt-get install python3), or make the "
            "interpreter's directories traversable by others (e.g. chmod o+x /root for pyenv).")
    same = [u for u in usable if u[1] == list(sys.version_info[:2])]
    path, _version, readable = (same or usable)[0]
    # Only a same-version interpreter can load the host's compiled extension modules.
    extra = tuple(readable) if same else ()
    if path != sys.executable:
        log.debug("sandbox: using %s (the sandbox user cannot use %s)", path, sys.executable)
    return _Interpreter(path, extra)


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    cpu = max(1, math.ceil(limits.cpu_s))
    mem = limits.memory_mb * 1024 * 1024
    return {
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
        "RLIMIT_AS": (mem, mem),
        "RLIMIT_NPROC": (limits.max_procs, limits.max_procs),
        "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }


def _env(workdir: str) -> dict[str, str]:
    # Built from scratch: nothing of the parent's environment (API keys...) is passed on.
    return {
        "PATH": _ENV_PATH,
        "HOME": workdir,
        "TMPDIR": workdir,  # tempfile would otherwise pick /tmp, which the hook refuses
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC and RLIMIT_AS.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _workdir_parent(iso: _Isolation) -> str:
    """Where to create working directories: the temp dir, unless the sandbox user could not
    reach it (e.g. TMPDIR under /root), then /tmp."""
    tmp = tempfile.gettempdir()
    if iso.uid is None:
        return tmp  # the snippet runs as ourselves
    parts = os.path.realpath(tmp).split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts) + 1)]
    if all(os.stat(d).st_mode & stat.S_IXOTH for d in dirs):
        return tmp
    return "/tmp"


def _remove_tree(path: str) -> None:
    def retry(func, p, _exc):  # a snippet may have left directories without permissions
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_status(fd: int) -> dict:
    data = b""
    os.set_blocking(fd, False)
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    status: dict = {}
    for line in data.decode(errors="replace").splitlines():
        try:
            status.update(json.loads(line))
        except ValueError:
            continue
    return status


def run_code(code: str, limits: SandboxLimits = SandboxLimits(), stdin: str = "") -> SandboxResult:
    """Run `code` as a Python program in the sandbox and return what happened.

    Raises SandboxError only when the sandbox cannot be set up."""
    return _run(code, limits, stdin, None)


async def arun_code(code: str, limits: SandboxLimits = SandboxLimits(),
                    stdin: str = "") -> SandboxResult:
    """`run_code` for asyncio code: runs in a worker thread. Cancelling the awaiting task kills
    the snippet (within ~0.1 s) and removes its working directory."""
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(_run, code, limits, stdin, cancel))
    # After a cancellation nobody awaits the thread's outcome; retrieve it so asyncio does not
    # log "exception was never retrieved".
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        raise


def _run(code: str, limits: SandboxLimits, stdin: str,
         cancel: threading.Event | None) -> SandboxResult:
    iso = _isolation(limits)
    interp = _interpreter(iso.as_user, limits.host_packages)
    workdir = tempfile.mkdtemp(prefix="maestro-sandbox-", dir=_workdir_parent(iso))
    stdin_file: IO[bytes] | None = None
    status_r = status_w = -1
    proc: subprocess.Popen[bytes] | None = None
    try:
        main = os.path.join(workdir, "main.py")
        with open(main, "w", encoding="utf-8") as f:
            f.write(code)
        if iso.uid is not None and iso.gid is not None:
            os.chown(main, iso.uid, iso.gid)
            os.chown(workdir, iso.uid, iso.gid)
        os.chmod(workdir, 0o700)
        os.chmod(main, 0o600)
        if stdin:
            # A file, not a pipe: no deadlock between writing stdin and reading stdout.
            stdin_file = tempfile.TemporaryFile()
            stdin_file.write(stdin.encode())
            stdin_file.seek(0)
        status_r, status_w = os.pipe()
        config = {
            "workdir": workdir, "status_fd": status_w, "rlimits": _rlimits(limits),
            "extra_path": list(interp.extra_path), "read_roots": list(_EXTRA_READ_ROOTS),
            "network": limits.network, "allow_subprocess": limits.allow_subprocess,
        }
        cmd = [*iso.prefix, interp.path, "-I", "-B", "-u", "-c", _BOOTSTRAP, json.dumps(config)]
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd, stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=_env(workdir),
                pass_fds=(status_w,), start_new_session=True)  # own session => own pgid
        except OSError as exc:
            raise SandboxError(f"could not start the sandbox ({cmd[0]}): {exc}") from exc
        os.close(status_w)
        status_w = -1
        out, err, reason = _collect(proc, limits, start, cancel, wrapped=bool(iso.prefix))
        duration = time.monotonic() - start
        status = _read_status(status_r)
    finally:
        if proc is not None and proc.poll() is None:  # only on an error of our own
            _stop(proc, wrapped=bool(iso.prefix))
            _kill_group(proc.pid)
            proc.wait()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        if stdin_file is not None:
            stdin_file.close()
        _remove_tree(workdir)

    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    if reason is None and not status.get("started"):
        # unshare/setpriv/the interpreter failed before our bootstrap ran: a set-up failure.
        hint = ""
        if "unshare" in stderr and "not permitted" in stderr:
            hint = (" Fix: namespaces need CAP_SYS_ADMIN; in a container run it with "
                    "--cap-add SYS_ADMIN (and a seccomp profile allowing unshare), or --privileged.")
        raise SandboxError(f"the sandbox did not start (exit {proc.returncode}): "
                           f"{stderr.strip()[-2000:]}{hint}")
    if "error" in status:
        raise SandboxError(f"the sandbox did not start: {status['error']}")
    if "signal" in status:
        returncode = -int(status["signal"])
    elif "exit" in status:
        returncode = int(status["exit"])
    elif reason is not None:  # we killed it before init could report
        returncode = -signal.SIGKILL
    else:  # init itself was killed by something outside
        returncode = proc.returncode
    if reason is None and "signal" in status:
        sig = int(status["signal"])
        used = float(status.get("cpu_s", 0.0))
        cpu_limit = _rlimits(limits)["RLIMIT_CPU"][0]
        # SIGXCPU at the soft limit; SIGKILL at the hard one if the snippet caught SIGXCPU.
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and used >= cpu_limit):
            reason = "cpu"
        else:
            reason = f"signal {sig}"
    if reason is None and returncode != 0:
        last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
        if _MEMORY_ERROR_RE.match(last):
            reason = "memory"
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=returncode,
                         timed_out=reason == "timeout", killed_reason=reason,
                         duration_s=duration)


def _wait_exited(pid: int, until: float, cancelled=None) -> bool:
    """Wait until child `pid` has exited, without reaping it (WNOWAIT), so that its process
    group id stays reserved. False when `until` passed or `cancelled()` became true first."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= until or (cancelled is not None and cancelled()):
            return False
        time.sleep(0.005)


def _children_of(pid: int) -> list[int]:
    # /proc/PID/task/PID/children needs CONFIG_PROC_CHILDREN, which not every kernel has.
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            if int(raw[raw.rindex(b")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return found


def _stop(proc: subprocess.Popen[bytes], *, wrapped: bool) -> None:
    """Kill a running snippet. With unshare in front, kill the namespace's init (its child)
    first: the kernel then kills everything in the PID namespace and unshare reaps init.
    Killing the whole group at once would orphan init to the host's PID 1, and its zombie
    would count against the user's RLIMIT_NPROC until that gets round to reaping it."""
    if wrapped:
        until = time.monotonic() + 10  # tearing down a big fork bomb can take a moment
        while time.monotonic() < until:
            # Looked up again each round: unshare may not have forked init yet.
            for child in _children_of(proc.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if _wait_exited(proc.pid, time.monotonic() + 0.1):
                return
        log.warning("sandbox: unshare (pid %d) did not exit after its child was killed; "
                    "killing its whole process group", proc.pid)
    _kill_group(proc.pid)


def _collect(proc: subprocess.Popen[bytes], limits: SandboxLimits, start: float,
             cancel: threading.Event | None, *, wrapped: bool) -> tuple[bytes, bytes, str | None]:
    """Read stdout/stderr until the run ends; kill it on timeout, too much output or cancel."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    deadline = start + limits.timeout_s
    reason: str | None = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            for key, _ in sel.select(min(remaining, 0.1) if cancel is not None else remaining):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = limits.max_output_bytes - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    reason = "output"
                    break
    if reason is None:
        # Output is closed, so init has exited or is exiting: wait for the leader.
        cancelled = cancel.is_set if cancel is not None else None
        if not _wait_exited(proc.pid, deadline, cancelled):
            reason = "cancelled" if cancel is not None and cancel.is_set() else "timeout"
    if reason is not None:
        _stop(proc, wrapped=wrapped)
    # Sweep the whole group, on a kill and after a normal exit alike (stray children). The
    # leader is not reaped yet, so its pgid cannot have been reused.
    _kill_group(proc.pid)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), reason
