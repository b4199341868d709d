"""Sweeps on a real multi-node Ray that loses nodes (docs/cluster.md).

Every test starts its own cluster on this machine with Ray's `cluster_utils`: a head and
worker nodes, each its own raylet with its own resources, the way Ray tests itself. The
head offers no CPUs, so trials run on the workers; removing a worker node kills its
raylet and every process on it, as a preempted or rebooted machine would. The sweep
driver is a separate process joined with `--address`, as on a real cluster.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # clusters of 3-4 raylets and whole sweeps: CI runs them with -m slow

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
SWEEP = """
name: tiny
protocol: synthetic
base: {{backbone: test_resnet, crop: 32, batch_size: 2, iters: {iters}, eval_every: {iters}, log_every: 2, checkpoint_every: 10,
        probe_images: 2, head_channels: 16, aspp_dilations: [1, 2], wandb_mode: disabled}}
grid: {{seed: [0]}}
methods:
  - {{name: fixed, selector: fixed}}
  - {{name: csl, selector: csl}}
resources: {{cpu: 1}}
{extra}"""
LONG = 200  # iterations: both trials still mid-run when the second one's start-up (seconds, cold) is over
TIMING = ("wall s", "selector ms/it")  # the columns a restart changes: time, not results


def sweep_file(tmp_path: Path, iters: int = 40, extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(iters=iters, extra=extra))
    return path


def sweep_command(path: Path, storage: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.orchestration.cli", "sweep", str(path), "--storage", str(storage), *args]


def leaderboard_without_timing(stdout: str) -> list[str]:
    """The printed leaderboard's rows, less the time columns."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    keep = [i for i, name in enumerate(header) if name not in TIMING]
    return ["|".join(c for i, c in enumerate(line.strip("|").split("|")) if i in keep) for line in lines]


def results(trials: Path) -> dict[str, dict]:
    """What a trial found, per trial: final mIoU, selection quality, the loss curves."""
    out = {}
    for rec in sorted(trials.glob("*/record.json")):
        r = json.loads(rec.read_text())
        curves = [{k: v for k, v in point.items() if not k.endswith("_s") and "time" not in k} for point in r["curves"]]
        out[rec.parent.name] = {"status": r["status"], "final": r["final"], "selection": r["selection"], "curves": curves}
    return out


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


@pytest.fixture
def cluster(request):
    """A head with no CPUs and one-CPU worker nodes (two, or `@pytest.mark.workers(n)`): as
    many trials run at once as there are workers, each on its own node."""
    from ray.cluster_utils import Cluster

    marker = request.node.get_closest_marker("workers")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(marker.args[0] if marker else 2):
        c.add_node(num_cpus=1)
    yield c
    c.shutdown()


def uninterrupted(tmp_path: Path, path: Path, *args: str) -> subprocess.CompletedProcess:
    """The same sweep with nothing lost (a private local Ray unless `args` name a cluster):
    what every test compares with."""
    run = subprocess.run(sweep_command(path, tmp_path / "reference", *args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def start_driver(path: Path, storage: Path, cluster) -> subprocess.Popen:
    """`cslbench sweep --address` joined to the cluster, in its own process, as on a real one."""
    return subprocess.Popen(sweep_command(path, storage, "--address", cluster.address), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lose_a_worker_once(cluster, folder: Path, pattern: str, running: int = 1) -> None:
    """Remove a worker node as soon as `running` trials have a checkpoint matching `pattern`
    under `folder` and none is complete, then add a fresh one, as a cluster's autoscaler
    would. With as many trials running as workers (one CPU each), the removed node takes a
    trial with it, whichever it is."""

    def all_mid_run() -> bool:
        done = complete(folder)
        assert not done, f"{sorted(done)} finished before a node was lost: the trials are too short for this machine"
        return len(list(folder.glob(pattern))) >= running

    wait_for(all_mid_run, what=f"{running} checkpoints {pattern} in {folder}")
    lose_node(cluster, next(iter(cluster.worker_nodes)))
    cluster.add_node(num_cpus=1)


def lose_node(cluster, node) -> None:
    """A node gone at once, as a machine that dies: SIGKILL to its raylet and to every
    process it started. Ray's workers run in their own process groups and, left alone,
    would train on until they noticed their raylet had died (a trial could finish meanwhile)."""
    processes = descendants(raylet_pid(node))
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cluster.remove_node(node, allow_graceful=False)


def test_a_worker_node_lost_mid_trial_costs_a_restart_from_its_checkpoint_not_the_sweep(tmp_path, cluster):
    """A worker node dies while both trials run: the trial on it starts again from its own
    checkpoint on another node, the sweep completes by itself with exit 0, and prints the
    leaderboard the uninterrupted sweep prints (CPU determinism; time columns aside). The
    record counts the restart and the iterations recomputed."""
    path = sweep_file(tmp_path, iters=LONG)
    reference = uninterrupted(tmp_path, path)
    storage = tmp_path / "cluster"
    driver = start_driver(path, storage, cluster)
    trials = storage / "tiny" / "trials"
    lose_a_worker_once(cluster, trials, "*/checkpoint.pt", running=2)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    assert leaderboard_without_timing(stdout) == leaderboard_without_timing(reference.stdout)
    assert results(trials) == results(tmp_path / "reference" / "tiny" / "trials")
    restarts = {name: json.loads((trials / name / "record.json").read_text())["restarts"] for name in ("fixed-seed=0", "csl-seed=0")}
    [(name, [lost])] = [(n, r) for n, r in restarts.items() if r]  # one trial was on the lost node
    assert lost["cause"] == "died" and 0 < lost["resumed_from"] < LONG and lost["resumed_from"] % 10 == 0
    assert lost["recomputed"] == lost["reached"] - lost["resumed_from"] >= 0
    assert f"{name} lost its process or node; Tune starts it again from its checkpoint" in stdout
    assert re.search(rf"{re.escape(name)} done, mIoU [\d.]+ \(went on 1x from its checkpoint, \d+ iterations recomputed\)", stdout)


@pytest.mark.workers(1)  # the one warm start runs on the one worker
def test_a_worker_node_lost_during_the_warm_start_stage(tmp_path, cluster):
    """The same for the warm start every trial continues from."""
    path = sweep_file(tmp_path, iters=10, extra="warm_start: {iters: 40, seed: 0}\n")
    reference = uninterrupted(tmp_path, path)
    storage = tmp_path / "cluster"
    driver = start_driver(path, storage, cluster)
    lose_a_worker_once(cluster, storage / "tiny" / "warmup", "*/checkpoint.pt")
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    assert leaderboard_without_timing(stdout) == leaderboard_without_timing(reference.stdout)
    assert results(storage / "tiny" / "warmup") == results(tmp_path / "reference" / "tiny" / "warmup")
    assert results(storage / "tiny" / "trials") == results(tmp_path / "reference" / "tiny" / "trials")
    [warm] = [json.loads(p.read_text()) for p in (storage / "tiny" / "warmup").glob("*/record.json")]
    assert [r["cause"] for r in warm["restarts"]] == ["died"]


def test_an_asha_search_trial_whose_node_dies_goes_on_from_its_checkpoint(tmp_path, cluster):
    """A search's sampled trials are retried like a sweep's: the one on the lost node starts
    again from its own checkpoint (its folder is named by the values sampled for it), and
    the search ends with every sample complete and nothing failed."""
    extra = f"search:\n  num_samples: 2\n  grace_period: {LONG}\n  space:\n    lr: {{loguniform: [0.001, 0.01]}}\n"
    path = sweep_file(tmp_path, iters=LONG, extra=extra)
    path.write_text(path.read_text().replace("  - {name: fixed, selector: fixed}\n", ""))
    storage = tmp_path / "cluster"
    driver = start_driver(path, storage, cluster)
    folder = storage / "tiny" / "search"
    lose_a_worker_once(cluster, folder, "*/checkpoint.pt", running=2)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stdout[-2000:] + stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("csl-seed=0-*/record.json"))]
    assert len(records) == 2 and all(r["status"] == "complete" and r["iteration"] == LONG for r in records)
    [lost] = [r["restarts"] for r in records if r["restarts"]]  # one sample was on the lost node
    assert [r["cause"] for r in lost] == ["died"] and 0 < lost[0]["resumed_from"] < LONG
    assert "csl-seed=0: best by val_miou (max) lr=" in stdout  # the samples ranked, not a leaderboard


def test_a_trial_failing_on_its_own_error_is_not_retried(tmp_path, cluster):
    """Divergence is the trial's own doing: it ends failed at once, whatever `retries` says."""
    path = sweep_file(tmp_path, iters=10, extra="retries: 3\n")
    path.write_text(path.read_text().replace("{name: csl, selector: csl}", "{name: nan, selector: fixed, lr: 1.0e+12}"))
    run = subprocess.run(sweep_command(path, tmp_path / "st", "--address", cluster.address), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    record = json.loads((tmp_path / "st" / "tiny" / "trials" / "nan-seed=0" / "record.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "DivergedError" and record["restarts"] == []
    assert "lost its process or node" not in run.stdout and "nan-seed=0 FAILED: DivergedError" in run.stdout


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def processes_on(node) -> list[str]:
    """The command lines of the processes a node's raylet started (Ray's workers and actors)."""
    return subprocess.run(["ps", "-o", "args=", "--ppid", str(raylet_pid(node))], capture_output=True, text=True).stdout.splitlines()


@pytest.mark.workers(0)
def test_a_data_parallel_trial_whose_worker_node_dies_goes_on_from_its_checkpoint(tmp_path, cluster):
    """replicas=2 on gloo: the trial (Tune's actor, one CPU) and its two Ray Train workers
    spread over a two-CPU and a one-CPU node; the node that holds a Train worker but not
    the trial dies mid-run. The trial starts again from its checkpoint and ends with the
    record the uninterrupted run writes."""
    big, small = cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=1)
    path = sweep_file(tmp_path)
    path.write_text(path.read_text().replace("wandb_mode: disabled}", "wandb_mode: disabled, replicas: 2}").replace("  - {name: csl, selector: csl}\n", ""))
    reference = uninterrupted(tmp_path, path, "--address", cluster.address)  # three CPUs: more than this machine's private Ray
    storage = tmp_path / "cluster"
    driver = start_driver(path, storage, cluster)
    trials = storage / "tiny" / "trials"
    wait_for(lambda: any(trials.glob("*/checkpoint.pt")), what="the data-parallel trial's first checkpoint")
    [victim] = [n for n in (big, small) if any("RayTrainWorker" in p for p in processes_on(n)) and not any("ImplicitFunc" in p for p in processes_on(n))]
    lose_node(cluster, victim)
    cluster.add_node(num_cpus=2)
    stdout, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-3000:]
    [record] = [json.loads(p.read_text()) for p in trials.glob("*/record.json")]
    assert [r["cause"] for r in record["restarts"]] == ["lost"] and record["restarts"][0]["resumed_from"] in (10, 20, 30)
    assert results(trials) == results(tmp_path / "reference" / "tiny" / "trials")
    assert leaderboard_without_timing(stdout) == leaderboard_without_timing(reference.stdout)


KEEPER = """
import sys, time
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
for _ in range(2):
    c.add_node(num_cpus=1)
print(c.address, flush=True)
time.sleep(3600)
"""


def start_cluster_elsewhere() -> tuple[subprocess.Popen, str]:
    """A head and two workers owned by another process (its own process group), so that the
    test can kill the whole cluster at once, head included."""
    keeper = subprocess.Popen([sys.executable, "-c", KEEPER], env=ENV, stdout=subprocess.PIPE, text=True, start_new_session=True)
    return keeper, keeper.stdout.readline().strip()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (by parent id in /proc), wherever its session or group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_cluster(keeper: subprocess.Popen) -> None:
    """SIGKILL to the whole cluster, and wait until every process of it is gone: a Ray
    worker in its own session would otherwise train on until it saw its raylet die, and a
    trial could complete after the test looked. Then forget the cluster's address, which
    Ray keeps in /tmp/ray for a later plain `ray.init()` to join (a dead head there makes
    it retry for minutes)."""
    from ray._common.utils import reset_ray_address

    processes = descendants(keeper.pid)
    os.killpg(keeper.pid, signal.SIGKILL)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    keeper.wait()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and not zombie(pid) for pid in processes), timeout=60,
             what="the killed cluster's processes to end")
    reset_ray_address()


def zombie(pid: int) -> bool:
    """Dead, waiting for its parent to read its exit status: it runs no more code."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def complete(trials: Path) -> dict[str, tuple]:
    out = {}
    for rec in trials.glob("*/record.json"):
        r = json.loads(rec.read_text())
        if r["status"] == "complete":
            out[rec.parent.name] = (r["updated"], rec.stat().st_mtime_ns)
    return out


def test_the_head_and_driver_lost_mid_sweep_then_resume_on_a_new_cluster(tmp_path):
    """kill -9 of the driver and of the whole cluster (head, workers, their trials) while
    trials run; a new cluster and `--resume` with the same storage then finish the sweep:
    the trials complete before the loss are kept as they were, the others go on from their
    checkpoints, and the leaderboard is the uninterrupted sweep's."""
    path = sweep_file(tmp_path, iters=80)  # long enough that a trial is caught mid-run
    path.write_text(path.read_text().replace("seed: [0]", "seed: [0, 1]"))
    reference = uninterrupted(tmp_path, path)
    storage = tmp_path / "cluster"
    trials = storage / "tiny" / "trials"
    keeper, address = start_cluster_elsewhere()
    driver = subprocess.Popen(sweep_command(path, storage, "--address", address), cwd=REPO, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(complete(trials)) >= 1 and len(list(trials.glob("*/checkpoint.pt"))) > len(complete(trials)),
             what="one trial complete and another mid-run")
    os.killpg(driver.pid, signal.SIGKILL)
    kill_cluster(keeper)  # the head, the workers and every trial on them
    driver.wait()
    before = complete(trials)
    mid_run = {p.parent.name for p in trials.glob("*/checkpoint.pt")} - set(before)  # as the kill left them
    assert 1 <= len(before) < 4 and mid_run, (before, mid_run)

    keeper, address = start_cluster_elsewhere()
    try:
        resumed = subprocess.run(sweep_command(path, storage, "--address", address, "--resume"), cwd=REPO, env=ENV,
                                 capture_output=True, text=True, timeout=600)
    finally:
        kill_cluster(keeper)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = complete(trials)
    assert len(after) == 4 and all(after[name] == stamp for name, stamp in before.items())  # kept, not rerun
    assert results(trials) == results(tmp_path / "reference" / "tiny" / "trials")
    assert leaderboard_without_timing(resumed.stdout) == leaderboard_without_timing(reference.stdout)
    for name in mid_run:  # from its checkpoint, not from zero
        [restart] = json.loads((trials / name / "record.json").read_text())["restarts"]
        assert restart["cause"] == "died" and restart["resumed_from"] > 0


def can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.workers(1)
@pytest.mark.skipif(not can_unshare(), reason="needs unprivileged user and mount namespaces (unshare -rm) to give a node its own disk")
def test_a_node_that_does_not_share_the_storage_stops_the_sweep_before_anything_runs(tmp_path, cluster):
    """A worker node whose storage path is its own disk (a tmpfs mounted over it in the
    node's own mount namespace: a cluster without a shared filesystem). The sweep stops at
    once, naming the node and the fix, and no trial has run anywhere."""
    storage = tmp_path / "storage"
    storage.mkdir()
    ray_cli = str(Path(sys.executable).parent / "ray")
    node = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs none {storage} && exec {ray_cli} start --address={cluster.address} --num-cpus=1 --block"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        import ray

        ray.init(address=cluster.address)
        try:
            wait_for(lambda: sum(n["Alive"] for n in ray.nodes()) == 3, timeout=60, what="the node with its own disk to join")
            local_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in {w.node_id for w in cluster.list_all_nodes()})
        finally:
            ray.shutdown()
        run = subprocess.run(sweep_command(sweep_file(tmp_path), storage, "--address", cluster.address), cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait()
    assert run.returncode != 0
    assert f"the storage folder {storage / 'tiny'} is not shared by every node of the Ray cluster" in run.stderr
    assert f"node {local_id[:8]} at " in run.stderr and "another disk" in run.stderr
    assert "filesystem every node mounts at the same path" in run.stderr
    assert sum(1 for line in run.stderr.splitlines() if line.strip().startswith("node ")) == 1  # the shared worker and the head pass
    assert not list((storage / "tiny").glob("trials/*/record.json"))  # nothing ran


def doc_commands() -> list[str]:
    text = (REPO / "docs" / "cluster.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_the_cluster_commands_of_the_docs_run_as_written(tmp_path):
    """docs/cluster.md's commands, in order, on this machine: the head, a worker node, the
    sweep, the sweep again with --resume, ray stop. Substituted: the head's address and a
    free port, the worker's size (one CPU, no GPU), a tiny sweep and a temporary storage."""
    import socket

    from ray._private.services import get_node_ip_address

    commands = doc_commands()
    assert [c.split()[:2] for c in commands] == [
        ["export", "RAY_AUTH_MODE=token"], ["ray", "start"], ["ray", "start"], ["cslbench", "sweep"], ["cslbench", "sweep"], ["ray", "stop"]]
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    path, storage = sweep_file(tmp_path), tmp_path / "shared"
    bin_dir = Path(sys.executable).parent
    swaps = {"<head-ip>": get_node_ip_address(), "6379": str(port), "--num-cpus=8 --num-gpus=1": "--num-cpus=2 --num-gpus=0",
             "sweeps/camvid.yaml": str(path), "/shared/cslbench": str(storage)}
    outputs, env = [], dict(ENV)
    try:
        for command in commands:
            for old, new in swaps.items():
                command = command.replace(old, new)
            if command.startswith("export "):
                key, _, value = command.removeprefix("export ").partition("=")
                env[key] = value
                continue
            program, *args = command.split()
            run = subprocess.run([str(bin_dir / program), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, f"{command}\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
            outputs.append(run.stdout)
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    sweep, resumed = outputs[2], outputs[3]
    assert "tiny main: 2 trials to run" in sweep and "| csl |" in sweep
    assert "| csl |" in resumed and "trials to run" not in resumed  # nothing left to run
    assert len(list((storage / "tiny" / "trials").glob("*/record.json"))) == 2
