"""Worker actors: starting them, describing them, running work on them while some may die, and
killing them when the job is done (whatever happens).

The job runners are the only users; the Ray lines stay here and in the actor classes, so the
runners read as plain data flow.
"""

from __future__ import annotations

import logging
import os
import resource
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from jobs.runtime.cluster import check_fits

log = logging.getLogger(__name__)

# Errors that mean "this actor (or its node) is gone", after which its work goes to another actor.
ACTOR_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_info(device: Any) -> dict[str, Any]:
    """Where the calling worker runs: node, GPU ids, device, pid, actor id, peak memory. Outside
    Ray (benchmarks run the workers' classes directly) only the device and pid are known."""
    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return {
        "node_id": ctx.get_node_id() if ctx else None,
        "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])] if ctx else [],
        "device": str(device),
        "pid": os.getpid(),
        "actor_id": ctx.get_actor_id() if ctx else None,
        "peak_rss_mb": peak_rss_mb(),
    }


@contextmanager
def started_workers(
    actor_class: Any, count: int, options: dict[str, Any], *args: Any, name: str | None = None
) -> Iterator[tuple[list[Any], list[dict[str, Any]]]]:
    """Start ``count`` actors of ``actor_class`` with ``options`` and constructor ``args``, wait
    until they are up (their ``info()``), and kill every one of them when the block ends, however
    it ends. Yields (the actors that started, their infos). Actors that die while starting are
    dropped; if none starts, RuntimeError carries the first actor's own error. ``name``: actors
    are named ``<name>-<i>`` so operators (and the fault tests) can find a run's workers."""
    check_fits(options.get("num_cpus", 1), options.get("num_gpus", 0))
    actors = [
        actor_class.options(**({"name": f"{name}-{i}"} if name else {}), **options).remote(*args)
        for i in range(count)
    ]
    try:
        infos, alive, errors = [], [], []
        for actor, ref in [(a, a.info.remote()) for a in actors]:
            try:
                infos.append(ray.get(ref))
                alive.append(actor)
            except ACTOR_LOST as err:
                errors.append(err)
                log.warning("a worker died while starting (%s); going on without it", type(err).__name__)
        if not alive:
            raise RuntimeError(f"no worker actor could start: {_cause(errors[0])}") from errors[0]
        yield alive, infos
    finally:
        stop_workers(actors)


def stop_workers(actors: Sequence[Any]) -> None:
    for actor in actors:
        ray.kill(actor)


def _cause(err: BaseException) -> str:
    """The first line of what killed an actor (its constructor's exception, when that was it)."""
    cause = getattr(err, "cause", None) or err.__cause__ or err
    text = str(getattr(cause, "cause", None) or cause)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def run_on_actors(
    actors: list[Any],
    call: Callable[[Any, Any], ray.ObjectRef],
    items: Iterable[Any],
    on_result: Callable[[Any, Any], None],
    max_retries: int = 3,
) -> list[Any]:
    """Run ``call(actor, item)`` for every item, one item per idle actor at a time, handing each
    result to ``on_result(item, result)`` as it arrives (in completion order), once its actor has
    been given its next item.

    An actor that dies is dropped and its item goes back in the queue for the remaining actors,
    at most ``max_retries`` times per item. Any other error fails the whole run. Returns the
    actors still alive.
    """
    fresh = iter(enumerate(items))  # pulled as actors free up: 10^8 shards are never all in memory
    queue: deque[tuple[int, Any]] = deque()  # items to retry, first
    retries: dict[int, int] = {}
    idle = list(actors)
    running: dict[ray.ObjectRef, tuple[Any, int, Any]] = {}

    def next_item() -> tuple[int, Any] | None:
        return queue.popleft() if queue else next(fresh, None)

    todo = next_item()  # the next item to hand out
    arrived: tuple[Any, Any] | None = None  # a result not yet handed to on_result
    while todo is not None or running:
        while idle and todo is not None:
            actor = idle.pop(0)
            running[call(actor, todo[1])] = (actor, *todo)
            todo = next_item()
        # The actor that brought a result has its next item already: the driver's work on the
        # result (merging trackers, writing tables) does not keep it idle.
        if arrived is not None:
            on_result(*arrived)
            arrived = None
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
            queue.append((n, item))
            if todo is None:
                todo = next_item()
            continue
        idle.append(actor)
        arrived = (item, result)
    if arrived is not None:
        on_result(*arrived)
    return idle
