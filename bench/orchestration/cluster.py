"""The Ray cluster a sweep runs on: connecting to it, checking it can hold a trial, and
checking that every node sees the storage folder (docs/cluster.md).

A sweep's records are its results, so every node must write them where the driver reads
them: a storage folder that is a node-local path on a cluster without a shared
filesystem would scatter records over the nodes' disks. `check_shared_storage` finds that
before any trial runs.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path


class ClusterError(ValueError):
    """The cluster cannot run this sweep as asked: names what and how to fix it."""


def connect_ray(address: str | None, verbose: int) -> None:
    """A private local Ray unless an address is given; a given one must answer within 10 s.
    (ray.init() without an address would join any cluster it finds in its temp folder,
    including one whose head has died, and retry for minutes.)"""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if ray.is_initialized():
        return
    options = dict(include_dashboard=False, log_to_driver=verbose > 1, configure_logging=False)
    if not address:
        ray.init(address="local", **options)
        return
    host_port = _bootstrap_address(address)
    if host_port is not None:
        host, _, port = host_port.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except (OSError, ValueError) as exc:
            raise ClusterError(
                f"Ray cluster at --address {address} ({host_port}) cannot be reached: {exc}. "
                "Start it (`ray start --head`), fix the address, or leave --address out to run on a private local Ray"
            ) from None
    ray.init(address=address, **options)


def check_fits(cpu: float, gpu: float, tag: str, replicas: int = 1, replica_gpus: bool = False) -> None:
    """A trial that this private Ray can never hold would wait for ever: an error instead. A
    data-parallel trial (`replicas` > 1) holds its own CPU plus one CPU (and one GPU) per
    Ray Train worker."""
    import ray

    have = ray.cluster_resources()
    workers = replicas if replicas > 1 else 0
    for name, want, key in (("CPUs", cpu + workers, "CPU"), ("GPUs", gpu + (workers if replica_gpus else 0), "GPU")):
        if want > have.get(key, 0):
            extra = f" ({workers} of them for its data-parallel workers, replicas={replicas})" if workers else ""
            raise ClusterError(
                f"{tag} trials ask for {want:g} {name}{extra} but this machine's Ray has {have.get(key, 0):g}: lower "
                f"{'warm_start.cpu' if tag == 'warmup' and key == 'CPU' else 'resources'}{' or replicas' if workers else ''} in the sweep file, "
                "or join a cluster that has them with --address"
            )


def _bootstrap_address(address: str) -> str | None:
    """host:port that --address names (`auto`: the cluster Ray last recorded on this machine)."""
    text = address.removeprefix("ray://")
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            found = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # ConnectionError when none is recorded
            raise ClusterError(f"--address auto: no running Ray cluster found on this machine ({exc})") from None
        if found is None:
            raise ClusterError("--address auto: no running Ray cluster found on this machine")
        return found
    return text if ":" in text else None


STORAGE_PROBE = ".storage-check"


def _probe_storage(folder: str, token: str) -> dict:
    """On one node: does it see the token the driver wrote in `folder`, and can it write
    beside it? (A node that does not see it has another disk there: it writes nothing.)"""
    seen = Path(folder) / "driver"
    if not (seen.is_file() and seen.read_text() == token):
        return {"sees_driver": False, "written": None, "error": None}
    import ray

    mark = Path(folder) / f"node-{ray.get_runtime_context().get_node_id()}"
    try:
        mark.write_text(token)
    except OSError as exc:
        return {"sees_driver": True, "written": None, "error": str(exc)}
    return {"sees_driver": True, "written": str(mark), "error": None}


def check_shared_storage(root: Path, timeout_s: float = 60.0) -> int:
    """Every alive node of the cluster reads a token the driver wrote under `root` and
    writes one back that the driver reads; any node that cannot is a ClusterError naming
    it. The number of nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    folder = Path(root) / STORAGE_PROBE / token
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "driver").write_text(token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_storage)
    pending = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(folder), token): n
        for n in nodes
    }
    ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    problems = [f"node {pending[r]['NodeID'][:8]} at {pending[r]['NodeManagerAddress']} did not answer within {timeout_s:.0f} s" for r in late]
    for ref in ready:
        node = pending[ref]
        where = f"node {node['NodeID'][:8]} at {node['NodeManagerAddress']}"
        try:
            seen = ray.get(ref)
        except Exception as exc:  # the node died or could not run the probe
            problems.append(f"{where}: the check failed ({type(exc).__name__})")
            continue
        if not seen["sees_driver"]:
            problems.append(f"{where} does not see the file the driver just wrote in {folder}: {root} there is another disk")
        elif seen["error"] is not None:
            problems.append(f"{where} cannot write {folder}: {seen['error']}")
        elif not Path(seen["written"]).is_file():
            problems.append(f"{where} wrote {seen['written']}, which the driver does not see")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    if problems:
        raise ClusterError(
            f"the storage folder {root} is not shared by every node of the Ray cluster:\n  " + "\n  ".join(problems)
            + "\nTrials would write their records and checkpoints to nodes' own disks. Put --storage on a filesystem every "
            "node mounts at the same path (NFS, a cluster filesystem), or run the sweep on one machine (leave --address out)"
        )
    return len(nodes)


def _lost_types() -> tuple[type, ...]:
    """Ray's errors for a process or node that went away; Ray Train's for a worker whose
    health check failed or hung (how a data-parallel run learns one of its nodes died)."""
    from ray import exceptions

    names = ("RayActorError", "NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectLostError", "OutOfMemoryError", "RaySystemError")
    lost = [getattr(exceptions, n) for n in names if hasattr(exceptions, n)]
    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError

        lost += [WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError]
    except ImportError:  # another Ray: its Train errors still carry the actor's error in their chain
        pass
    return tuple(lost)


def lost_worker(exc: BaseException) -> bool:
    """Whether `exc` says a process or node of the cluster went away (an actor died, a node
    was lost, a worker crashed or was killed for memory), anywhere in its chain or among a
    Ray Train worker group's failures, rather than the run's own code raising."""
    lost = _lost_types()
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, lost):
            return True
        stack += [e.__cause__, e.__context__]
        stack += list(getattr(e, "worker_failures", {}).values() or [])  # Ray Train: rank -> error
        stack += [getattr(e, "controller_failure", None), getattr(e, "health_check_failure", None)]
    return False
