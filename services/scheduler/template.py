"""A schedule's spec template: a job spec in which ``latest:PREFIX`` stands for the newest
checkpoint under PREFIX, resolved each time the schedule fires.

The template is validated when the schedule is added (with each prefix standing in for the file
it will name) and rendered at fire time with the run id the scheduler derived, so every scheduled
run is a normal spec that ``zfatlas validate`` accepts and ``zfatlas run`` runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from jobs.kinds import parse_spec
from jobs.specs.base import SpecBase, SpecError
from jobs.uris import parse_uri
from services.scheduler.checkpoints import newest_checkpoint

LATEST = "latest:"


def _substitute(node: Any, path: str, resolve: Callable[[str, str], str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), resolve) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}.{i}", resolve) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith(LATEST):
        return resolve(node[len(LATEST) :].strip(), path)
    return node


def latest_prefixes(template: dict[str, Any]) -> dict[str, str]:
    """``field.path -> PREFIX`` for every ``latest:PREFIX`` value in the template."""
    found: dict[str, str] = {}

    def note(prefix: str, path: str) -> str:
        found[path] = prefix
        return prefix

    _substitute(template, "", note)
    return found


def check_template(template: dict[str, Any]) -> SpecBase:
    """Validate a template; raises :class:`SpecError` with one ``field.path: reason`` per problem."""
    if not isinstance(template, dict):
        raise SpecError(["spec: expected a mapping of fields"])
    problems = []
    if "run_id" in template:
        problems.append("run_id: set by the scheduler for each run (<schedule>-<time>); remove it")
    for path, prefix in latest_prefixes(template).items():
        try:
            parse_uri(prefix)
        except ValueError as exc:
            problems.append(f"{path}: {LATEST}{prefix}: {exc}")
    try:
        spec = parse_spec(_substitute(template, "", lambda prefix, _: prefix))
    except SpecError as exc:
        problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)
    return spec


def render(
    template: dict[str, Any],
    run_id: str,
    resolve: Callable[[str, str | None], str] = newest_checkpoint,
) -> SpecBase:
    """The spec of one scheduled run: ``latest:`` values resolved (``resolve(prefix,
    endpoint_url)``, by default the newest checkpoint in the store) and ``run_id`` set."""
    endpoint = template.get("endpoint_url")
    data = _substitute(copy.deepcopy(template), "", lambda prefix, _: resolve(prefix, endpoint))
    data["run_id"] = run_id
    return parse_spec(data)
