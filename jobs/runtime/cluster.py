"""Connecting to Ray and deciding what each worker actor asks of the cluster."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """Use the Ray already initialized in this process, else the cluster at ``address`` or
    ``RAY_ADDRESS``, else start a local Ray bound to 127.0.0.1."""
    if ray.is_initialized():
        return
    # Without this a local Ray binds the machine's external interface; with it, loopback only.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        log.info("starting a local Ray on 127.0.0.1")
        # "local": always a fresh instance; without it ray.init() attaches to whatever cluster this
        # machine last started, which is not what "no RAY_ADDRESS" means to a user.
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


#: Set on autoscaling clusters, whose nodes appear only once work asks for them.
AUTOSCALING_ENV = "ZFATLAS_AUTOSCALING"


class ResourcesError(RuntimeError):
    """A worker asks for more than any node of the cluster has: it would wait forever."""


def check_fits(num_cpus: float, num_gpus: float = 0.0) -> None:
    """Fail at once, naming what was asked and what the nodes have, when no alive node can hold
    one worker (Ray would keep such an actor pending without a word). Skipped with
    ``ZFATLAS_AUTOSCALING=1``, where missing nodes are started on demand."""
    if os.environ.get(AUTOSCALING_ENV, "").lower() in ("1", "true", "yes"):
        return
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) + 1e-9 >= num_cpus and r.get("GPU", 0) + 1e-9 >= num_gpus for r in nodes):
        return
    have = "; ".join(sorted(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes)) or "none"
    raise ResourcesError(
        f"each worker asks for {num_cpus:g} CPUs and {num_gpus:g} GPUs (resources.cpus_per_worker, "
        f"resources.gpus_per_worker) but no node of the cluster has that much (nodes: {have}); "
        f"ask for less, or set {AUTOSCALING_ENV}=1 on an autoscaling cluster"
    )


def worker_options(workers: int, gpus_per_worker: float, cpus_per_worker: float) -> tuple[int, dict]:
    """How many actors to start and the resources each declares.

    With GPUs in the cluster, each actor takes ``gpus_per_worker`` (one by default) and at most as
    many actors start as the GPUs can hold; without GPUs, actors take CPUs instead.
    """
    gpus = cluster_gpus()
    if gpus > 0:
        per = max(gpus_per_worker, 1e-3)
        count = max(1, min(workers, int(gpus / per + 1e-9)))
        return count, {"num_gpus": per, "num_cpus": cpus_per_worker}
    return max(1, workers), {"num_cpus": cpus_per_worker}
