"""Connecting to Ray: a local cluster of our own, or a running one whose address we probe first."""

from __future__ import annotations

from .errors import UserError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes on a dead address; a TCP probe answers in seconds."""
    import socket

    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc} (check --address and that the head node is up)") from None


def connect_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        check_reachable(address)
    # no --address: always a fresh local Ray ("local"), never a stale cluster from an earlier session
    ray.init(address=address or "local", include_dashboard=False)
