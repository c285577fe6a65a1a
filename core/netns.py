"""A test network of real hosts: network namespaces on one bridge, rate-limited, partitionable.

``Switch(hosts=4, rate="100mbit")`` creates, as root, one namespace per host and a "switch"
namespace with a bridge; each host gets a veth link to the bridge with a ``tbf`` qdisc on both ends
(this kernel has ``tbf``/``htb``, no ``netem``), so every host has its own full-duplex link of that
rate and its own loopback. Addresses are ``10.213.0.<i + 1>/24`` on the veths inside these
namespaces only; the host's own namespace and interfaces are never touched (every link is created
directly inside the namespaces, with ``ip -n``), and two networks never see each other (each has
its own bridge), so the same subnet can be used by concurrent runs.

Faults: :meth:`Switch.partition` / :meth:`Switch.heal` take a host's link down and up (``ip link
set ... down``); :meth:`Switch.block_inbound` makes a host drop every inbound connection (nftables
inside its namespace: a volunteer behind NAT); :meth:`Switch.block_tcp` drops its outgoing
connections to one address and port. :meth:`Switch.urlopen` / :meth:`Switch.get_json` talk HTTP
from inside a host's namespace (a thread that ``setns``-es itself), so a test reads a service that
listens only there.

Names carry a fixed prefix and the creating process's id (``cogennet-<pid>-h0``), so a later run
removes what a crashed one left behind (:func:`remove_stale`) without touching a live run's.
``Switch.remove()`` deletes the namespaces (their veths and rules go with them); it is idempotent,
and :meth:`Switch.create` registers it with ``atexit`` as a last resort. Used by the cross-host
tests and by the benchmarks in ``bench/``; it needs only the standard library (and root, ``ip``, ``tc``).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

PREFIX = "cogennet-"
SUBNET = "10.213.0"  # /24, only on the veths inside the namespaces created here
_TBF = ("burst", "1mb", "latency", "50ms")
_CLONE_NEWNET = 0x40000000
_NAT_RULES = """
table inet cogen_nat {
  chain input {
    type filter hook input priority 0; policy drop;
    iif "lo" accept
    ct state established,related accept
  }
}
"""
T = TypeVar("T")


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
    """Delete namespaces left by runs whose process is gone; returns their names."""
    removed = []
    for name in list_namespaces():
        if not name.startswith(PREFIX):
            continue
        owner = name[len(PREFIX) :].split("-", 1)[0]
        if owner.isdigit() and _pid_alive(int(owner)) and int(owner) != os.getpid():
            continue  # a run still going
        _delete_namespace(name)
        removed.append(name)
    return removed


def check_available(nftables: bool = False) -> None:
    """Raise :class:`NetnsUnavailable` with a one-line reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (this process is not root)")
    for tool in ("ip", "tc", *(("nft",) if nftables else ())):
        if shutil.which(tool) is None:
            package = "nftables" if tool == "nft" else "iproute2"
            raise NetnsUnavailable(f"`{tool}` is not installed (apt-get install {package})")


def in_namespace(namespace: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread moved into ``namespace``'s network (sockets it opens live there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {namespace}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class Switch:
    """``hosts`` namespaces, each on its own ``rate`` link to a bridge in a switch namespace."""

    def __init__(self, hosts: int, rate: str | None = "1gbit"):
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be between 1 and 200")
        self.hosts = hosts
        self.rate = rate
        base = f"{PREFIX}{os.getpid()}"
        self.switch = f"{base}-sw"
        self.names = [f"{base}-h{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
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
                self._add_host(i, name, address)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            self.remove()
            detail = getattr(e, "stderr", "") or ""
            raise NetnsUnavailable(f"cannot build the namespaces: {' '.join(e.cmd)}: {detail.strip()}") from e
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        self._run_in(name, "ip", "link", "set", "lo", "up")

    def _add_host(self, i: int, name: str, address: str) -> None:
        self._add_namespace(name)
        port = f"p{i}"
        # created inside the switch namespace, its other end straight inside the host's
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
        self._run_in(self.switch, "ip", "link", "set", port, "master", "br0")
        self._run_in(self.switch, "ip", "link", "set", port, "up")
        self._run_in(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        self._run_in(name, "ip", "link", "set", "eth0", "up")
        if self.rate is not None:
            # one tbf per direction: the host's uplink (its eth0) and its downlink (the switch port)
            self._run_in(name, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", self.rate, *_TBF)
            self._run_in(
                self.switch, "tc", "qdisc", "add", "dev", port, "root", "tbf", "rate", self.rate, *_TBF
            )

    @staticmethod
    def _run_in(namespace: str, *cmd: str, stdin: str | None = None) -> None:
        subprocess.run(
            ["ip", "netns", "exec", namespace, *cmd],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

    def exec_prefix(self, host: int) -> list[str]:
        """The command prefix that runs a program inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.names[host]]

    def set_rate(self, host: int, rate: str) -> None:
        """Change ``host``'s link rate, both directions (a slow volunteer, a congested uplink)."""
        tbf = ("tbf", "rate", rate, *_TBF)
        self._run_in(self.names[host], "tc", "qdisc", "replace", "dev", "eth0", "root", *tbf)
        self._run_in(self.switch, "tc", "qdisc", "replace", "dev", f"p{host}", "root", *tbf)

    # faults

    def partition(self, host: int) -> None:
        """Cut ``host`` off the network (its link goes down; its own loopback keeps working)."""
        self._run_in(self.names[host], "ip", "link", "set", "eth0", "down")

    def heal(self, host: int) -> None:
        """Reconnect a partitioned host (its link comes up with its address and route)."""
        self._run_in(self.names[host], "ip", "link", "set", "eth0", "up")

    def block_inbound(self, host: int) -> None:
        """Drop every connection that other hosts open to ``host`` (a volunteer behind NAT)."""
        check_available(nftables=True)
        self._run_in(self.names[host], "nft", "-f", "-", stdin=_NAT_RULES)

    def block_tcp(self, host: int, address: str, port: int) -> None:
        """Drop ``host``'s outgoing TCP connections to ``address:port`` (one unreachable service)."""
        check_available(nftables=True)
        rules = (
            "table inet cogen_block {\n  chain output {\n"
            "    type filter hook output priority 0; policy accept;\n"
            f"    ip daddr {address} tcp dport {port} drop\n  }}\n}}\n"
        )
        self._run_in(self.names[host], "nft", "-f", "-", stdin=rules)

    # talking to services inside a host

    def urlopen(self, host: int, url: str, timeout_s: float = 10.0) -> bytes:
        """GET ``url`` from inside ``host``'s namespace; returns the body (raises OSError on failure)."""

        def get() -> bytes:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return response.read()

        return in_namespace(self.names[host], get)

    def get_json(self, host: int, url: str, timeout_s: float = 10.0) -> Any:
        return json.loads(self.urlopen(host, url, timeout_s))

    def reachable(self, host: int, url: str, timeout_s: float = 2.0) -> bool:
        """Whether ``url`` answers a GET from inside ``host`` within ``timeout_s``."""
        try:
            self.urlopen(host, url, timeout_s)
            return True
        except OSError:
            return False

    def remove(self) -> None:
        """Delete every namespace this switch created (idempotent)."""
        while self._created:
            _delete_namespace(self._created.pop())

    def __enter__(self) -> Switch:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
