"""Sandbox launcher: confines one untrusted Python program, then execs it (stdlib only).

Run by ``services.reward.sandbox`` as ``python -I -S jail.py '<json config>'``; never imported by
the service. The launcher enters new network, PID and mount namespaces (plus a user namespace
when not root), forks PID 1 of the new PID namespace (so the whole tree dies with it), which mounts a private
/proc, drops to the slot's uid (root only), sets rlimits, turns on no_new_privs and a Landlock
ruleset (writes only under the work dir, no TCP), and forks the program: the script runs in
that confined child of this isolated interpreter. Any step that fails makes it exit with ``EXIT_UNAVAILABLE``
and a reason on stderr: the program never runs half-confined.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import runpy
import signal
import struct
import sys
import traceback
from typing import Any

EXIT_UNAVAILABLE = 97  # the sandbox could not be set up; stderr says why
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 2, 1 << 3
FS_WRITE_FILE = 1 << 1
# All filesystem rights of each Landlock ABI (index = ABI version): bits 0-12, then REFER,
# TRUNCATE, IOCTL_DEV as later ABIs added them.
FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_CONNECT_TCP = 3
SCOPE_ABSTRACT_UNIX_AND_SIGNAL = 3

libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """One confinement step failed; the program must not run."""


def _check(result: int, what: str) -> int:
    if result < 0:
        raise SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces() -> None:
    """New net/pid/mount namespaces; unprivileged users get them inside a new user namespace."""
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS
    if os.geteuid() == 0:
        _check(libc.unshare(flags), "unshare(net, pid, mount)")
        return
    uid, gid = os.geteuid(), os.getegid()
    _check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user, net, pid, mount)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def private_proc() -> None:
    """Stop mount propagation to the host, then show only our own PID namespace in /proc."""
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount /proc")


def drop_user(uid: int | None) -> None:
    if uid is None:
        return
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SetupError("setuid did not take effect")


def set_limits(limits: dict[str, int]) -> None:
    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _add_path_rule(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr is packed
        _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, attr, 0), path)
    finally:
        os.close(fd)


def landlock(workdir: str) -> int:
    """Read/execute everywhere, write only beneath ``workdir``; TCP bind/connect denied (ABI ≥ 4)."""
    abi = _check(libc.syscall(SYS_LANDLOCK_CREATE, None, 0, 1), "landlock ABI version")
    fs_all = FS_ALL_BY_ABI[min(abi, 5)]
    if abi >= 6:
        attr = struct.pack("=QQQ", fs_all, NET_BIND_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_AND_SIGNAL)
    elif abi >= 4:
        attr = struct.pack("=QQ", fs_all, NET_BIND_CONNECT_TCP)
    else:
        attr = struct.pack("=Q", fs_all)
    ruleset = _check(libc.syscall(SYS_LANDLOCK_CREATE, attr, len(attr), 0), "landlock ruleset")
    _add_path_rule(ruleset, "/", FS_EXECUTE | FS_READ_FILE | FS_READ_DIR)
    _add_path_rule(ruleset, "/dev/null", FS_READ_FILE | FS_WRITE_FILE)
    _add_path_rule(ruleset, workdir, fs_all)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0), "landlock restrict")
    os.close(ruleset)
    return abi


def confine_and_exec(cfg: dict[str, Any]) -> None:
    private_proc()
    set_limits(cfg["limits"])
    drop_user(cfg["uid"])
    # Set after setuid, which clears it: if the launcher dies, PID 1 (and so the namespace) dies.
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    landlock(cfg["workdir"])
    os.chdir(cfg["workdir"])
    # PID 1 ignores kernel signals it has no handler for (SIGXCPU at the CPU limit), so the
    # program runs as its child; PID 1 only waits for it, and its exit tears down the rest.
    program = os.fork()
    if program == 0:
        run_program(cfg["argv"], cfg["env"])
    _exit_like(os.waitpid(program, 0)[1])


def run_program(argv: list[str], env: dict[str, str]) -> None:
    """Run the script ``argv[0]`` as __main__ in this (already confined, isolated) interpreter.

    Saves a second interpreter start per run; the process holds nothing secret (its
    environment is the stripped one and the config names only the work dir and limits).
    """
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(argv)
    sys.path.insert(0, os.getcwd())
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # the program's own crash: report it like the interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_like(status: int) -> None:
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    try:
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        enter_namespaces()
    except (SetupError, OSError) as err:
        sys.stderr.write(f"sandbox unavailable: {err}\n")
        os._exit(EXIT_UNAVAILABLE)
    child = os.fork()
    if child == 0:
        try:
            confine_and_exec(cfg)
        except (SetupError, OSError) as err:
            sys.stderr.write(f"sandbox unavailable: {err}\n")
        os._exit(EXIT_UNAVAILABLE)
    _exit_like(os.waitpid(child, 0)[1])


if __name__ == "__main__":
    main()
