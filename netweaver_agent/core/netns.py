"""Network namespaces: open sockets inside one, run commands inside one.

A socket keeps the namespace it was created in, so the agent can capture
in the hypervisor's namespace and send from a probe source's namespace
without moving the whole process: a short-lived thread enters the
namespace with ``setns(2)``, creates the socket and ends.  ``setns`` needs
CAP_SYS_ADMIN: lab and ``netns:`` probe sources only.
"""

import ctypes
import ctypes.util
import os
import socket
# bandit B404: run() takes argument lists only, never a shell
import subprocess  # nosec B404
import threading

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = '/var/run/netns'

_libc = None


class NetnsError(RuntimeError):
    """A network namespace could not be entered."""


class CommandError(subprocess.CalledProcessError):
    """A command failed; its message names the command and its stderr."""

    def __str__(self):
        return (f"command {' '.join(self.cmd)!r} failed with exit status "
                f"{self.returncode}: {self.stderr or '(no output)'}")


def _setns(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_path(name):
    """The bind-mount path of the named namespace (as ``ip netns`` makes)."""
    if not name or '/' in name or name in ('.', '..'):
        raise NetnsError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def run_in_netns(name, func, *args, **kwargs):
    """Call ``func(*args, **kwargs)`` in a thread inside namespace ``name``.

    ``name=None`` calls it directly, in the current namespace.  Returns what
    ``func`` returns and raises what it raises.
    """
    if name is None:
        return func(*args, **kwargs)
    path = netns_path(name)
    result = {}

    def body():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result['error'] = NetnsError(
                f"network namespace {name!r} cannot be opened: {exc}")
            return
        try:
            try:
                _setns(fd)
            except OSError as exc:
                result['error'] = NetnsError(
                    f"cannot enter network namespace {name!r}: {exc}"
                    " (setns needs CAP_SYS_ADMIN)")
                return
            try:
                result['value'] = func(*args, **kwargs)
            except BaseException as exc:  # re-raised in the caller
                result['error'] = exc
        finally:
            os.close(fd)

    # The thread ends inside the namespace; nothing else ever runs on it.
    thread = threading.Thread(target=body, name=f'netns-{name}', daemon=True)
    thread.start()
    thread.join()
    if 'error' in result:
        raise result['error']
    return result['value']


def socket_in_netns(name, family, type_, proto=0):
    """A new socket created inside namespace ``name`` (None: here)."""
    return run_in_netns(name, socket.socket, family, type_, proto)


def netns_argv(name, argv):
    """``argv`` prefixed to run inside namespace ``name`` (None: as is)."""
    if name is None:
        return list(argv)
    netns_path(name)
    return ['ip', 'netns', 'exec', name, *argv]


def run(argv, netns=None, check=True, timeout=30, **kwargs):
    """Run an argument list (never a shell string), optionally in a netns.

    A failure raises :class:`CommandError` whose message includes
    stderr, so errors name what failed.
    """
    full = netns_argv(netns, argv)
    # bandit B603: an argument list, shell=False
    proc = subprocess.run(full, capture_output=True, text=True,  # nosec B603
                          timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise CommandError(
            proc.returncode, full, proc.stdout,
            proc.stderr.strip() or proc.stdout.strip())
    return proc


def exists(name):
    """Whether the named namespace exists."""
    return os.path.exists(netns_path(name))
