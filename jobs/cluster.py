"""Connecting to Ray and running work on a set of actors that may die.

The job runners are the only users; the Ray lines stay here and in the actor classes, so the
runners read as plain data flow.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)

# Errors that mean "this actor (or its node) is gone", after which its work goes to another actor.
ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


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


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for an actor holding ``num_cpus`` (at least one)."""
    return max(1, int(num_cpus))


def run_on_actors(
    actors: list[Any],
    call: Callable[[Any, Any], ray.ObjectRef],
    items: Iterable[Any],
    on_result: Callable[[Any, Any], None],
    max_retries: int = 3,
) -> list[Any]:
    """Run ``call(actor, item)`` for every item, one item per idle actor at a time, handing each
    result to ``on_result(item, result)`` as it arrives (in completion order).

    An actor that dies is dropped and its item goes back in the queue for the remaining actors,
    at most ``max_retries`` times per item. Any other error fails the whole run. Returns the
    actors still alive.
    """
    queue: deque[tuple[int, Any]] = deque(enumerate(items))
    retries: dict[int, int] = {}
    idle = list(actors)
    running: dict[ray.ObjectRef, tuple[Any, int, Any]] = {}
    while queue or running:
        while queue and idle:
            actor, (n, item) = idle.pop(0), queue.popleft()
            running[call(actor, item)] = (actor, n, item)
        if not running:
            raise RuntimeError("every worker actor died; nothing left to run the job on")
        [done], _ = ray.wait(list(running), num_returns=1)
        actor, n, item = running.pop(done)
        try:
            result = ray.get(done)
        except ACTOR_LOST as err:
            retries[n] = retries.get(n, 0) + 1
            if retries[n] > max_retries:
                raise RuntimeError(f"gave up on {item!r} after {max_retries} retries") from err
            log.warning("worker actor lost (%s); retrying %r elsewhere", type(err).__name__, item)
            queue.appendleft((n, item))
            continue
        idle.append(actor)
        on_result(item, result)
    return idle
