"""Real Redis Clusters and real hosts for tests: redis-server nodes, network namespaces.

`RedisClusterNodes` starts 3 primaries and 3 replicas (`--cluster-enabled yes`, AOF on every
node) on free ports of one address and joins them with `redis-cli --cluster create`.
`LabNetwork` makes a bridge and one network namespace per "host" with a veth pair each, so
servers in different namespaces reach each other (and the cluster) only through addresses
of their own; where namespaces cannot be made it says why, and callers fall back to loopback.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

from tests.servers import no_redis, wait_until


def _port_free(host: str, port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def cluster_ports(host: str, count: int) -> list[int]:
    """`count` ports whose cluster-bus twins (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 45000)
        if port not in ports and _port_free(host, port) and _port_free(host, port + 10000):
            ports.append(port)
    return ports


@dataclass
class RedisClusterNodes:
    """Six redis-server processes joined into one cluster (3 primaries, 3 replicas).

    With `tls_cert` (a PEM that is its own CA, with its key beside it as `key.pem`) the
    nodes speak TLS only, also on the cluster bus and for replication.
    """

    host: str = "127.0.0.1"
    nodes: int = 6
    replicas: int = 1
    node_timeout_ms: int = 1500
    tls_cert: str | None = None
    extra: list[str] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="redis-cluster-"))

    @property
    def url(self) -> str:
        """Any one node: the client learns the rest from it."""
        if self.tls_cert:
            return f"rediss://{self.host}:{self.ports[0]}/0?ssl_ca_certs={self.tls_cert}"
        return f"redis://{self.host}:{self.ports[0]}/0"

    def _tls_cli(self) -> list[str]:
        return ["--tls", "--cacert", self.tls_cert] if self.tls_cert else []

    def _tls_server(self, port: int) -> list[str]:
        if not self.tls_cert:
            return ["--port", str(port)]
        key = os.path.join(os.path.dirname(self.tls_cert), "key.pem")
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.tls_cert,
                "--tls-key-file", key, "--tls-ca-cert-file", self.tls_cert,
                "--tls-auth-clients", "no", "--tls-cluster", "yes", "--tls-replication", "yes"]

    def start(self) -> RedisClusterNodes:
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise FileNotFoundError("redis-server/redis-cli")
        self.ports = cluster_ports(self.host, self.nodes)
        for port in self.ports:
            self.start_node(port)
        for port in self.ports:
            wait_until(lambda p=port: self._cli(p, "PING") == "PONG", 10,
                       what=f"cluster node {port}")
        addresses = [f"{self.host}:{port}" for port in self.ports]
        subprocess.run(["redis-cli", *self._tls_cli(), "--cluster", "create", *addresses,
                        "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self.healthy, 30, interval=0.2, what="the cluster to be ok on every node")
        wait_until(self.replicas_synced, 30, interval=0.2, what="every replica to sync")
        return self

    def start_node(self, port: int) -> None:
        """Start (or restart, with its AOF and node table) the node on `port`."""
        directory = os.path.join(self.workdir, str(port))
        os.makedirs(directory, exist_ok=True)
        self.processes[port] = subprocess.Popen(
            ["redis-server", *self._tls_server(port), "--bind", self.host, "--dir", directory,
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no",
             *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def _cli(self, port: int, *command: str) -> str:
        try:
            out = subprocess.run(["redis-cli", *self._tls_cli(), "-h", self.host, "-p",
                                  str(port), *command],
                                 capture_output=True, text=True, timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return out.stdout.strip()

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok and sees every slot served."""
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            info = self._cli(port, "CLUSTER", "INFO")
            if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
        return True

    def replicas_synced(self) -> bool:
        """Every replica's link to its primary is up (a replica that never synced cannot
        be elected, so a failover test must wait for this)."""
        replicas = 0
        for port, process in self.processes.items():
            if process.poll() is not None:
                continue
            info = self._cli(port, "INFO", "replication")
            if "role:slave" in info:
                replicas += 1
                if "master_link_status:up" not in info or "master_sync_in_progress:0" not in info:
                    return False
        return replicas == self.nodes - self.nodes // (1 + self.replicas)

    def primaries(self) -> list[int]:
        """Ports of the nodes that are primaries now (as the first live node sees it)."""
        for port, process in self.processes.items():
            if process.poll() is None:
                lines = self._cli(port, "CLUSTER", "NODES").splitlines()
                return [int(line.split()[1].split("@")[0].rsplit(":", 1)[1]) for line in lines
                        if "master" in line.split()[2] and "fail" not in line.split()[2]]
        return []

    def kill(self, port: int) -> None:
        """SIGKILL one node: a crash, not a shutdown."""
        process = self.processes[port]
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=10)


@dataclass
class LabNetwork:
    """A bridge in this namespace plus one network namespace per host, each on a veth pair.

    Names carry this process's id, so concurrent test sessions never collide; `close`
    removes everything it made. `gateway` is this namespace's address on the bridge.
    """

    hosts: int = 2
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    namespaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    gateway: str = ""
    _made: list[list[str]] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"b14x{self.tag}"

    def _subnet(self) -> str:
        seed = int(self.tag)
        return f"10.{140 + seed % 100}.{(seed // 100) % 250}"

    def open(self) -> LabNetwork:
        """Build it, or raise OSError saying what could not be made."""
        if shutil.which("ip") is None:
            raise OSError("iproute2 (`ip`) is not installed")
        subnet = self._subnet()
        try:
            self._run(["link", "add", self.bridge, "type", "bridge"], ["link", "del", self.bridge])
            self.gateway = f"{subnet}.1"
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index in range(self.hosts):
                self._host(index, subnet)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            self.close()
            raise OSError(f"network namespaces cannot be made here: {detail.strip()}") from exc
        return self

    def _host(self, index: int, subnet: str) -> None:
        name = f"t14-{self.tag}-{index}"
        outer, inner = f"v14x{self.tag}{index}", f"w14x{self.tag}{index}"
        self._run(["netns", "add", name], ["netns", "del", name])
        self._run(["link", "add", outer, "type", "veth", "peer", "name", inner],
                  ["link", "del", outer])
        _ip("link", "set", inner, "netns", name)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        address = f"{subnet}.{10 + index}"
        for args in (["addr", "add", f"{address}/24", "dev", inner], ["link", "set", inner, "up"],
                     ["link", "set", "lo", "up"]):
            _ip("netns", "exec", name, "ip", *args)
        self.namespaces.append(name)
        self.addresses.append(address)

    def _run(self, make: list[str], undo: list[str]) -> None:
        _ip(*make)
        self._made.append(undo)

    def reachable(self, index: int, port: int, timeout: float = 10) -> None:
        """Wait until this namespace can open a TCP connection to host `index` on `port`."""
        def answers() -> bool:
            try:
                with socket.create_connection((self.addresses[index], port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(answers, timeout, what=f"{self.addresses[index]}:{port}")

    def close(self) -> None:
        for undo in reversed(self._made):
            _ip(*undo, check=False)
        self._made.clear()


def started_cluster(lab_network: LabNetwork | str, what: str) -> Iterator[RedisClusterNodes]:
    """A private Redis Cluster on the lab network's gateway (loopback without one), stopped
    after its use; where redis-server is missing, `no_redis(what)` (a failure under
    REQUIRE_REDIS). A fixture yields from it."""
    host = lab_network.gateway if isinstance(lab_network, LabNetwork) else "127.0.0.1"
    nodes = RedisClusterNodes(host=host)
    try:
        nodes.start()
    except FileNotFoundError:
        nodes.stop()
        no_redis(what)
    try:
        yield nodes
    finally:
        nodes.stop()
