"""Network namespaces for benchmarks: peers on their own rate-limited links behind one switch.

``Switch(peers=4, rate="1gbit")`` creates, as root, one namespace per peer and a "switch" namespace
with a bridge; each peer gets a veth link to the bridge with a ``tbf`` qdisc on both ends, so every
peer has its own full-duplex link of that rate. Addresses are ``10.213.0.<i + 1>/24`` on the veths
inside these namespaces only; the host's own namespace and interfaces are never touched (every link
is created directly inside the namespaces, with ``ip -n``).

Names carry a fixed prefix and the creating process's id (``cogenbench-<pid>-p0``), so a later run
can remove what a crashed one left behind (:func:`remove_stale`) without touching a live run's.
``Switch.remove()`` deletes the namespaces (their veths go with them); it is idempotent, and
:meth:`Switch.create` registers it with ``atexit`` as a last resort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess

PREFIX = "cogenbench-"
SUBNET = "10.213.0"  # /24, only on the veths inside the namespaces created here
_TBF = ("burst", "1mb", "latency", "50ms")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, or no ``ip``/``tc``)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def list_namespaces() -> list[str]:
    """Names of the network namespaces on this machine (``ip netns list``)."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(name: str) -> None:
    """Kill what still runs inside ``name`` (our own leftovers, by pid) and delete the namespace."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "delete", name, check=False)


def remove_stale() -> list[str]:
    """Delete namespaces left by benchmark runs whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and _pid_alive(int(owner)) and int(owner) != os.getpid():
            continue  # a benchmark still running
        _delete_namespace(name)
        removed.append(name)
    return removed


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` with a one-line reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (this process is not root)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"`{tool}` (iproute2) is not installed")


class Switch:
    """``peers`` namespaces, each on its own ``rate`` link to a bridge in a switch namespace."""

    def __init__(self, peers: int, rate: str = "1gbit"):
        if not 2 <= peers <= 200:
            raise ValueError("peers must be between 2 and 200")
        self.peers = peers
        self.rate = rate
        base = f"{PREFIX}{os.getpid()}"
        self.switch = f"{base}-sw"
        self.names = [f"{base}-p{i}" for i in range(peers)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(peers)]
        self._created: list[str] = []

    def create(self) -> Switch:
        """Build the namespaces, links, addresses and qdiscs; on any failure remove what was made."""
        check_available()
        atexit.register(self.remove)
        try:
            self._add_namespace(self.switch)
            self._run_in(self.switch, "ip", "link", "add", "br0", "type", "bridge")
            self._run_in(self.switch, "ip", "link", "set", "br0", "up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses, strict=True)):
                self._add_peer(i, name, address)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.remove()
            detail = getattr(e, "stderr", "") or ""
            raise NetnsUnavailable(f"cannot build the namespaces: {' '.join(e.cmd)}: {detail.strip()}") from e
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        self._run_in(name, "ip", "link", "set", "lo", "up")

    def _add_peer(self, i: int, name: str, address: str) -> None:
        self._add_namespace(name)
        port = f"p{i}"
        # created inside the switch namespace, its other end straight inside the peer's
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        self._run_in(self.switch, "ip", "link", "set", port, "master", "br0")
        self._run_in(self.switch, "ip", "link", "set", port, "up")
        self._run_in(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        self._run_in(name, "ip", "link", "set", "eth0", "up")
        # one tbf per direction: the peer's uplink (its eth0) and its downlink (the switch port)
        self._run_in(name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate, *_TBF)
        self._run_in(self.switch, "tc", "qdisc", "add", "dev", port, "root", "tbf", "rate", self.rate, *_TBF)

    @staticmethod
    def _run_in(namespace: str, *cmd: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", namespace, *cmd], capture_output=True, text=True, timeout=30, check=True
        )

    def exec_prefix(self, peer: int) -> list[str]:
        """The command prefix that runs a program inside peer ``peer``'s namespace."""
        return ["ip", "netns", "exec", self.names[peer]]

    def remove(self) -> None:
        """Delete every namespace this switch created (idempotent)."""
        while self._created:
            _delete_namespace(self._created.pop())

    def __enter__(self) -> Switch:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
