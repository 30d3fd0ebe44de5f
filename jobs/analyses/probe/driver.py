"""The probe job on Ray: feature extraction of the probe dataset, then every (network, layer)'s
folds and classifiers, on the same analysis workers (features go through the object store, so a
GPU does the fitting when present)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from jobs.analyses.probe.spec import ProbeSpec
from jobs.analyses.probe.tables import PROBE_SCORES_SCHEMA, PROBE_TABLE_SCHEMA
from jobs.analyses.probe.work import PROBE_SLICE, extract, fit
from jobs.analyses.results import common_fields
from jobs.analyses.worker import analysis_workers
from jobs.datasets import open_dataset
from jobs.rendering.plots import line_figure
from jobs.runtime.actors import run_on_actors
from jobs.specs.base import SpecError
from jobs.store import RunWriter
from zfcore.zfnet import PAPER_TABLE7


def run_probe(spec: ProbeSpec, run: RunWriter, *, quiet: bool = False) -> dict[str, Any]:
    """Tables 4/5/7: linear probes on frozen features of each layer, trained on ``probe_dataset``
    with N images per class over several folds, for the trained network and a random-init one."""
    t0 = time.perf_counter()
    source = open_dataset(spec.probe_dataset, spec.preprocess, spec.endpoint_url)
    networks = ["trained"] + (["random_init"] if spec.include_random_init else [])
    slices = [list(range(s, min(s + PROBE_SLICE, len(source)))) for s in range(0, len(source), PROBE_SLICE)]
    extract_items = [{"network": net, "indices": s} for net in networks for s in slices]
    items = max(len(extract_items), len(networks) * len(spec.layers))
    with analysis_workers(spec, run, items, spec.probe_dataset) as (actors, workers):
        parts: dict[str, list[dict[str, Any]]] = {net: [] for net in networks}
        skipped: list[tuple[str, str]] = []

        def collect_features(item: dict[str, Any], out: dict[str, Any]) -> None:
            if item["network"] == networks[0]:
                skipped.extend(out["skipped"])  # both networks read the same images
            if len(out["indices"]):
                parts[item["network"]].append(out)

        t_extract = time.perf_counter()
        alive = run_on_actors(
            actors, lambda a, it: a.work.remote(extract, it), extract_items, collect_features
        )
        extract_s = time.perf_counter() - t_extract
        if not parts[networks[0]]:
            raise RuntimeError("no image of the probe dataset could be read")
        labels_by_net, features_by_net = {}, {}
        for net, outs in parts.items():
            outs.sort(key=lambda o: int(o["indices"][0]))
            labels_by_net[net] = np.concatenate([o["labels"] for o in outs])
            features_by_net[net] = {
                layer: np.concatenate([o["features"][layer] for o in outs]) for layer in spec.layers
            }
        labels = labels_by_net[networks[0]]
        num_classes = max(len(source.class_names), int(labels.max()) + 1)
        counts = np.bincount(labels, minlength=num_classes)
        present = counts[counts > 0]
        need = max(spec.train_per_class) + 1
        if present.min() < need:
            raise SpecError(
                [
                    f"train_per_class: {max(spec.train_per_class)} training images per class leave no "
                    f"test image for a class with {int(present.min())} images in probe_dataset; "
                    f"need at least {need} per class"
                ]
            )

        label_ref = ray.put(labels)
        refs = {
            (net, layer): ray.put(features_by_net[net][layer]) for net in networks for layer in spec.layers
        }
        fit_items = [
            {"network": net, "layer": layer, "num_classes": num_classes}
            for net in networks
            for layer in spec.layers
        ]
        scores: list[dict[str, Any]] = []
        t_fit = time.perf_counter()
        run_on_actors(
            alive,
            lambda a, it: a.work.remote(fit, it, refs[it["network"], it["layer"]], label_ref),
            fit_items,
            lambda item, out: scores.extend(out["rows"]),
        )
        fit_s = time.perf_counter() - t_fit

    layer_order = {layer: i for i, layer in enumerate(spec.layers)}
    scores.sort(
        key=lambda r: (
            networks.index(r["network"]),
            r["classifier"],
            r["train_per_class"],
            layer_order[r["layer"]],
            r["fold"],
        )
    )
    run.write_table(
        "scores.parquet", pa.Table.from_pylist(scores, schema=PROBE_SCORES_SCHEMA), PROBE_SCORES_SCHEMA
    )
    summary = probe_summary(scores, networks, spec)
    run.write_table(
        "table7.parquet", pa.Table.from_pylist(summary, schema=PROBE_TABLE_SCHEMA), PROBE_TABLE_SCHEMA
    )
    # Table 7's layout: a row per (network, classifier, N), a column per layer, "mean ± std" in %.
    table7: dict[str, dict[str, str]] = {}
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for s in summary:  # layer-major within each row, in spec.layers order
        row = f"{s['network']}/{s['classifier']}/{s['train_per_class']}"
        table7.setdefault(row, {})[s["layer"]] = (
            f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f}"
        )
        panel = curves.setdefault(f"{s['train_per_class']} training images per class", {})
        means, stds = panel.setdefault(f"{s['network']} {s['classifier']}", ([], []))
        means.append(s["accuracy_mean"])
        stds.append(s["accuracy_std"])
    plot = run.put_png("plots/probe.png", line_figure(curves, spec.layers, ylabel="test accuracy"))
    return {
        **common_fields(spec, source, workers, skipped),
        "images_used": int(len(labels)),
        "num_classes": int(num_classes),
        "layers": spec.layers,
        "networks": networks,
        "feature_dims": {layer: int(features_by_net[networks[0]][layer].shape[1]) for layer in spec.layers},
        "table7": table7,
        "tables": {"scores": "scores.parquet", "table7": "table7.parquet"},
        "plots": {"probe": plot},
        "timings": {"extract_s": extract_s, "fit_s": fit_s, "total_s": time.perf_counter() - t0},
    }


def probe_summary(
    scores: list[dict[str, Any]], networks: list[str], spec: ProbeSpec
) -> list[dict[str, Any]]:
    """Mean ± std over folds per (network, classifier, layer, N), with Table 7's numbers beside the
    trained network's rows (as fractions, like the accuracies)."""
    groups: dict[tuple[str, str, str, int], list[float]] = {}
    for r in scores:
        groups.setdefault((r["network"], r["classifier"], r["layer"], r["train_per_class"]), []).append(
            r["accuracy"]
        )
    out = []
    for net in networks:
        for clf in spec.classifiers:
            for n in spec.train_per_class:
                for layer in spec.layers:  # innermost: each table7 row and plot line runs over layers
                    accs = np.asarray(groups[net, clf, layer, n], np.float64)
                    paper = PAPER_TABLE7.get((clf, layer)) if net == "trained" else None
                    out.append(
                        {
                            "network": net,
                            "classifier": clf,
                            "layer": layer,
                            "train_per_class": n,
                            "accuracy_mean": float(accs.mean()),
                            "accuracy_std": float(accs.std()),
                            "folds": len(accs),
                            "paper_caltech101": paper[0] / 100 if paper else None,
                            "paper_caltech256": paper[1] / 100 if paper else None,
                        }
                    )
    return out
