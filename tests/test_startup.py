"""Start-up: a fresh local Ray starts while the driver's torch-bound pre-flight runs (issue 23), and a
refused run still writes nothing and leaves nothing running."""

from __future__ import annotations

import os
import threading

import pytest

from aae_dist import launch
from aae_dist.cli import main
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401  (world: the matrix's module fixture)


def ray_start_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aae-dist-ray-start"]


@pytest.fixture(autouse=True)
def no_ray_in_this_process():
    """Earlier tests (the Python API's Ray run) may leave this process joined to a Ray: these tests start from none."""
    from aae_dist.ray_connect import disconnect

    disconnect()
    yield


def refused(capsys, argv, needle: str) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.ray
def test_a_torch_bound_refusal_stops_the_ray_it_overlapped(world, monkeypatch, capsys):  # noqa: F811
    """The prior is checked (torch imported) while the local Ray starts; its refusal shuts that Ray down
    again and nothing is written."""
    import ray

    seen = []
    real = launch.check_models
    monkeypatch.setattr(launch, "check_models", lambda cfg, m: (seen.append(bool(ray_start_threads())), real(cfg, m)))
    before = tree_digest(world)
    refused(capsys, T(world, "prior.kind=mixture", extra=["--workers", "1"]), "2-D prior but model.latent_dim=8")
    assert seen == [True]  # Ray was starting while the torch-bound checks ran
    assert not ray.is_initialized() and not ray_start_threads()
    assert tree_digest(world) == before


@pytest.mark.ray
def test_the_command_leaves_the_ray_it_started_before_the_interpreter_ends(monkeypatch):
    """`aae-dist` (cli.entry) shuts down the local Ray its run started, and the thread that started it, itself:
    left to Ray's atexit hook, Ray's threads can outlive the finalising interpreter (a SIGSEGV after a good run)."""
    import ray

    from aae_dist import cli, ray_connect

    def a_run_on_ray(argv=None):
        ray_connect.start_early()
        ray_connect.connect_ray(None)
        assert ray.is_initialized() and ray_start_threads()
        return 0

    monkeypatch.setattr(cli, "main", a_run_on_ray)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 0
    assert not ray.is_initialized() and not ray_start_threads() and ray_connect._early is None


@pytest.mark.ray
def test_a_local_rays_workers_reach_its_own_state_api_past_a_dead_clusters_record():
    """Ray's processes find the State API through the last `ray start` cluster on record; a record of a
    cluster killed rather than stopped made each lookup wait ~40 s and fail (Ray Train's placement-group
    cleaner then held up the end of every fit by ~13 s).  A local Ray of ours is found by its own workers."""
    import socket

    import ray
    from ray._private.utils import get_ray_address_file

    from aae_dist.ray_connect import connect_ray

    variable = os.environ.get("RAY_API_SERVER_ADDRESS")
    record = get_ray_address_file(None)
    before = open(record).read() if os.path.exists(record) else None
    with socket.socket() as s:  # a port nothing listens on: the dead cluster
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as fh:
        fh.write(f"127.0.0.1:{dead}")
    try:
        connect_ray(None)
        assert os.environ.get("RAY_API_SERVER_ADDRESS") == variable  # the driver's children and job clients never see ours

        @ray.remote
        class Controller:
            def ping(self):
                return True

        @ray.remote
        def state_seen_by_a_worker(actor_id: str) -> str:
            from ray.util.state import get_actor

            return get_actor(actor_id, timeout=10).state

        controller = Controller.remote()
        assert ray.get(controller.ping.remote())
        assert ray.get(state_seen_by_a_worker.remote(controller._actor_id.hex()), timeout=120) == "ALIVE"
    finally:
        if before is None:
            os.remove(record)
        else:
            with open(record, "w") as fh:
                fh.write(before)


@pytest.mark.parametrize("case", ["plan refusal", "dry run"])
def test_no_ray_is_started_early_for_a_plan_refusal_or_a_dry_run(world, monkeypatch, capsys, case):  # noqa: F811
    """Refusals that need no torch come before Ray's start; --dry-run never starts one."""
    import ray

    started = []
    monkeypatch.setattr(launch, "start_early", lambda *a: started.append(a))
    if case == "plan refusal":
        refused(capsys, T(world, "data.batch_size=1", data="tiny", extra=["--workers", "4"]), "4 workers but split 'train'")
    else:
        assert main(T(world, extra=["--workers", "1", "--dry-run"])) == 0
    assert not started and not ray.is_initialized()


def test_the_progress_file_counts_restarts_and_is_read_whole(tmp_path):
    """A local Ray's progress board is a file: a restarted rank 0 (a new FileBoard on the same path) continues
    the count of starts and warns once; the driver reads what was last written, and nothing before the first post."""
    from aae_dist.console import FileBoard, read_board_file

    path = str(tmp_path / "board.json")
    assert read_board_file(path) == ({}, [])
    first = FileBoard(path)
    first.put({"start": 0, "step": 0, "total": 10})
    first.put({"step": 4, "total": 10})
    assert read_board_file(path) == ({"start": 0, "step": 4, "total": 10}, [])
    again = FileBoard(path)  # the worker group restarted from the step-3 checkpoint
    again.put({"start": 3, "step": 3, "total": 10})
    latest, warnings = read_board_file(path)
    assert latest["start"] == 3 and latest["step"] == 3
    assert warnings == ["a worker was lost: the group restarted from step 3 (restart 1)"]
    assert [p.name for p in tmp_path.iterdir()] == ["board.json"]  # no temporary file left beside it
