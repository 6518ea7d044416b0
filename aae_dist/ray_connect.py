"""Connecting to Ray: a local cluster of our own, or a running one whose address we probe first."""

from __future__ import annotations

from .errors import UserError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes on a dead address; a TCP probe answers in seconds."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = host_port(address).rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {shown(address)}: {exc} (check --address and that the head node is up)") from None


def host_port(address: str) -> str:
    """HOST:PORT of [SCHEME://][USER:PASS@]HOST:PORT[/PATH]; a password may hold '/', so user-info ends at the last '@'."""
    return address.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0]


def shown(address: str) -> str:
    """The address for a message: user-info (with or without a scheme) replaced by ***."""
    from .storage import redact

    if "://" not in address and "@" in address:
        return "***@" + address.rpartition("@")[2]
    return redact(address)


def connect_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` or start a fresh local Ray (never a stale cluster from an earlier session).

    Quiet unless verbose: workers' and Ray's own output stay in Ray's log folder (`ray_log_dir`),
    not on the console.  The local dashboard (bound to 127.0.0.1) is kept: without it Ray's State
    API is off and Ray Train's clean-up actor fails to query it every second."""
    import logging

    import ray

    if ray.is_initialized():
        return
    if address:
        check_reachable(address)
    if not verbose:
        for name in ("ray", "ray.train", "ray.data", "ray.tune"):
            logging.getLogger(name).setLevel(logging.ERROR)
    kw = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1"}
    ray.init(address=address or "local", log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR, **kw)


def ray_log_dir() -> str | None:
    """Where this Ray session keeps its logs (workers' output included)."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 - no public accessor in Ray 2.60
    except Exception:  # noqa: BLE001
        return None
