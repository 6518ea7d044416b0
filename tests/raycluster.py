"""Start real Ray nodes on loopback for tests, and stop them by process group, also on failure.

Ray swaps 127.0.0.1 for the machine's interface address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
and in that mode refuses a second node.  So nodes take other loopback addresses (head 127.0.0.2,
further nodes 127.0.0.3, ...), which Ray keeps as they are, and the variable is left unset: every
byte stays on 127.0.0.0/8."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
HEAD_IP = "127.0.0.2"


def loopback_env(extra: dict | None = None) -> dict:
    """The environment for Ray processes of a multi-node loopback cluster (and drivers joining it)."""
    env = {**os.environ, **ENV, **(extra or {})}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this test process: the kernel can return a port
    just released, and two of a node's services on one port (runtime-env agent and dashboard agent)
    made the raylet's requests land on the wrong server (HTTP 405, seen once in CI)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def ray_exe() -> str:
    return shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")


class LocalCluster:
    """A head and optional extra nodes, each `ray start --block` in its own process group."""

    def __init__(self, extra_env: dict | None = None):
        self.env = loopback_env(extra_env)
        self.procs: list[subprocess.Popen] = []
        self.commands: list = []  # per node: a function giving its `ray start` command with fresh ports
        self.relaunched = 0
        self.nodes = 0
        self.port = free_port()
        self.dashboard_port = free_port()
        self.log_dir = tempfile.mkdtemp(prefix="aae-raynodes-")

    def _node_ports(self) -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0"]

    def _launch(self, index: int) -> None:
        """Start node `index` (its output kept in a log file, quoted when a wait fails)."""
        with open(os.path.join(self.log_dir, f"node{index}.log"), "ab") as log:
            proc = subprocess.Popen(self.commands[index](), env=self.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        if index < len(self.procs):
            self.procs[index] = proc
        else:
            self.procs.append(proc)

    def start_head(self, cpus: int, resources: dict | None = None) -> None:
        self.commands.append(lambda: [
            ray_exe(), "start", "--head", "--block", "--node-ip-address", HEAD_IP, "--port", str(self.port),
            "--num-cpus", str(cpus), "--dashboard-host", HEAD_IP, "--dashboard-port", str(self.dashboard_port),
            "--resources", json.dumps(resources or {}), "--disable-usage-stats", *self._node_ports()])
        self._launch(0)
        self.wait_port(self.port)
        self.wait_port(self.dashboard_port, timeout=90)

    def add_node(self, cpus: int, resources: dict | None = None) -> None:
        self.nodes += 1
        ip = f"127.0.0.{2 + self.nodes}"
        self.commands.append(lambda: [
            ray_exe(), "start", "--block", "--address", self.address, "--node-ip-address", ip,
            "--num-cpus", str(cpus), "--resources", json.dumps(resources or {}), "--disable-usage-stats", *self._node_ports()])
        self._launch(len(self.commands) - 1)

    def _log_tails(self) -> str:
        out = []
        for i, p in enumerate(self.procs):
            state = "running" if p.poll() is None else f"exited {p.returncode}"
            try:
                with open(os.path.join(self.log_dir, f"node{i}.log"), errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
            except OSError:
                tail = ""
            out.append(f"--- node {i} ({state}):\n{tail}")
        return "\n".join(out)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    @property
    def job_api(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard_port}"

    def wait_port(self, port: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                socket.create_connection((HEAD_IP, port), 0.5).close()
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"port {port} did not open\n{self._log_tails()}")

    def wait_nodes(self, n: int, timeout: float = 150) -> list[str]:
        """Wait for n live nodes; every node's address (as Ray reports it) must be on loopback.

        A joining node whose `ray start` exited is started again (twice at most) with fresh ports: a
        port found free can be taken before its service binds it (an outgoing connection's local
        port comes from the same range); a CI run once lost a whole module to a node that never joined."""
        code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                "print(' '.join(x['NodeManagerAddress'] for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i in range(1, len(self.procs)):
                if self.procs[i].poll() is not None and self.relaunched < 2:
                    self.relaunched += 1
                    self._launch(i)
            out = subprocess.run([sys.executable, "-c", code, self.address], env=self.env, capture_output=True, text=True, timeout=60)
            lines = out.stdout.strip().splitlines()
            addresses = lines[-1].split() if lines else []
            if len(addresses) >= n:
                off = [a for a in addresses if ipaddress.ip_address(a) not in ipaddress.ip_network("127.0.0.0/8")]
                assert not off, f"Ray nodes outside loopback: {off}"
                return addresses
            time.sleep(1)
        raise TimeoutError(f"{n} nodes did not join\n{self._log_tails()}")

    def worker_pids(self, marker: str = "RayTrainWorker") -> list[int]:
        """Training worker processes of THIS cluster (same process sessions as our nodes)."""
        sessions = {os.getsid(p.pid) for p in self.procs if p.poll() is None}
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                if marker in cmd and os.getsid(int(d)) in sessions:
                    pids.append(int(d))
            except (OSError, ProcessLookupError):
                continue
        return pids

    def kill_node(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Stop node `index` (0 = head) with its raylet and workers (one process session): SIGKILL is a
        node failure, SIGTERM a node taken away (its raylet tells the cluster it is leaving)."""
        p = self.procs[index]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 3  # then SIGKILL the group: a graceful Ray shutdown takes 30+ s
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(self.log_dir, ignore_errors=True)
