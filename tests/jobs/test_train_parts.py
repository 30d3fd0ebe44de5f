"""The train job's parts in one process, without Ray: data split and shards, the step, metrics,
schedules, checkpoints and feature evolution."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from jobs.datasets import Batch, ProceduralSource
from jobs.kinds import parse_spec
from jobs.networks import load_model
from jobs.runtime.device import to_device
from jobs.specs.base import ModelSpec
from jobs.store import begin_run, open_store
from jobs.store.encoding import conform
from jobs.train.checkpoints import (
    FINAL,
    LATEST,
    epoch_key,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from jobs.train.data import ShardReader, epoch_order, shard, split_indices
from jobs.train.evolution import (
    DISPLAY_SIDE,
    EVOLUTION_SCHEMA,
    select_channels,
    snapshot,
    write_snapshot,
    write_strips,
)
from jobs.train.metrics import METRICS_SCHEMA, EpochMeter, filter_summary, layer_stats, validate
from jobs.train.schedule import PLATEAU_PATIENCE, make_scheduler, step_schedule
from jobs.train.step import Autocast, TrainStepper, with_precision
from zfcore.renorm import filter_rms
from zfcore.zfnet import build


class HoleySource(ProceduralSource):
    """Procedural images where every index in ``broken`` is unreadable."""

    def __init__(self, n: int, broken: set[int]) -> None:
        super().__init__(n, 32, seed=0)
        self.broken = broken

    def read(self, indices: Sequence[int]) -> Batch:
        ok = [int(i) for i in indices if int(i) not in self.broken]
        batch = super().read(ok)
        batch.skipped = [(self.image_id(int(i)), "broken") for i in indices if int(i) in self.broken]
        return batch


def _spec(**fields):
    return parse_spec({"kind": "train", "name": "t", **fields})


def test_split_is_disjoint_seeded_and_probe_is_the_first_images() -> None:
    split = split_indices(100, 0.1, 8, seed=3)
    assert len(split.val) == 10 and len(split.train) == 90
    assert set(split.val).isdisjoint(split.train) and set(split.val) | set(split.train) == set(range(100))
    assert np.array_equal(split.val, split_indices(100, 0.1, 8, seed=3).val)
    assert not np.array_equal(split.val, split_indices(100, 0.1, 8, seed=4).val)
    assert list(split.probe) == list(range(8))
    assert len(split_indices(5, 0.0, 64, seed=0).val) == 0 and len(split_indices(5, 0.0, 64, 0).probe) == 5
    assert len(split_indices(3, 0.01, 1, seed=0).val) == 1  # a positive fraction holds out one image


def test_shards_are_equal_disjoint_and_fixed() -> None:
    train = split_indices(101, 0.1, 1, seed=0).train  # 91 images
    shards = [shard(train, r, 3, equal=True) for r in range(3)]
    assert [len(s) for s in shards] == [30, 30, 30]
    assert len(set().union(*map(set, shards))) == 90
    val = split_indices(101, 0.1, 1, seed=0).val
    assert sum(len(shard(val, r, 3, equal=False)) for r in range(3)) == len(val)
    assert not np.array_equal(epoch_order(30, 0, 1, 0), epoch_order(30, 0, 2, 0))
    assert np.array_equal(epoch_order(30, 0, 1, 0), epoch_order(30, 0, 1, 0))
    with pytest.raises(ValueError):
        shard(train, 3, 3, equal=True)


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0], ids=["cached", "streamed"])
def test_reader_yields_every_step_and_skips_unreadable_images(cache_bytes: int) -> None:
    # Positions 0..3 of the order are all broken: that batch is refilled from later images.
    source = HoleySource(20, broken={0, 1, 2, 3, 11})
    reader = ShardReader(source, np.arange(20), cache_bytes=cache_bytes)
    assert reader.cached == bool(cache_bytes)
    batches = list(reader.batches(np.arange(20), 4))
    assert len(batches) == reader.steps(4) == 5
    assert all(len(labels) for _, labels in batches)
    assert batches[0][0].shape[1:] == (32, 32, 3) and batches[0][0].dtype == np.uint8
    assert [len(b[1]) for b in batches[1:]] == [4, 3, 4, 4]
    assert {i for i, _ in reader.skipped} >= {"proc-00000011"}
    with pytest.raises(RuntimeError, match="could be read"):
        list(ShardReader(HoleySource(4, {0, 1, 2, 3}), np.arange(4), cache_bytes=cache_bytes)
             .batches(np.arange(4), 2))


def test_step_learns_renormalizes_and_counts_hits() -> None:
    torch.manual_seed(0)
    net = build("zfnet-small")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    batch = ProceduralSource(16, 64).read(range(16))
    images, labels = batch.images, batch.labels
    stepper = TrainStepper(net, net, opt, torch.device("cpu"), renorm_radius=0.1, augment_images=False,
                           generator=torch.Generator().manual_seed(0))
    first = stepper.step(images, labels)
    for _ in range(7):
        last = stepper.step(images, labels)
    assert last.loss < first.loss
    assert first.images == 16 and 0 <= last.top1 <= last.top5 <= 16
    assert first.rescaled > 0  # He-initialized conv1 filters start above the 0.1 radius
    assert float(filter_rms(net.features.conv1.weight).max()) <= 0.1 + 1e-6


def test_bf16_forward_returns_fp32_logits() -> None:
    net = build("zfnet-small").eval()
    wrapped = with_precision(net, "bf16", torch.device("cpu"))
    assert isinstance(wrapped, Autocast) and with_precision(net, "fp32", torch.device("cpu")) is net
    x = to_device(ProceduralSource(2, 64).read(range(2)).images, torch.device("cpu"))
    assert wrapped(x).dtype == torch.float32
    assert torch.allclose(wrapped(x), net(x), atol=5e-2)


def test_metrics_rows_fit_the_declared_schema() -> None:
    torch.manual_seed(0)
    net = build("zfnet-small")
    source = ProceduralSource(24, 64)
    probe = to_device(source.read(range(8)).images, torch.device("cpu"))
    rows = layer_stats(net, probe, 0.1, batch_size=4)
    assert [r["layer"] for r in rows] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert all(0 <= r["dead_fraction"] <= 1 and 0 <= r["at_radius_fraction"] <= 1 for r in rows)
    summary = filter_summary(rows)
    meter = EpochMeter()
    stepper = TrainStepper(net, net, torch.optim.SGD(net.parameters(), lr=0.01), torch.device("cpu"),
                           renorm_radius=0.1, augment_images=True, generator=torch.Generator())
    batch = source.read(range(16))
    meter.add(stepper.step(batch.images, batch.labels))
    totals = meter.totals(torch.device("cpu"))
    assert totals["images"] == 16 and 0 <= totals["train_top1_error"] <= 1
    assert summary["conv1_at_radius"] == pytest.approx(1.0)  # renormalized: all conv1 filters at 0.1
    val = validate(net, ShardReader(source, np.arange(16, 24)), 4, torch.device("cpu"))
    no_val = validate(net, ShardReader(source, np.arange(0)), 4, torch.device("cpu"))
    assert no_val["val_loss"] is None and val["val_loss"] > 0
    row = {"epoch": 1, "step": 1, "lr": 0.01, **totals, **val, "epoch_s": 1.0, "images_per_s": 16.0,
           **summary}
    row2 = {**row, "epoch": 2, **no_val}
    table = conform(pa.Table.from_pylist([row, row2]), METRICS_SCHEMA)
    assert table.num_rows == 2 and table.column("val_loss").null_count == 1


def _lr_after(n: int, val_error: float | None, **fields) -> float:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = make_scheduler(_spec(**fields), opt)
    for _ in range(n):
        opt.step()
        step_schedule(scheduler, val_error, 1.0)
    return opt.param_groups[0]["lr"]


def test_schedules() -> None:
    assert _lr_after(PLATEAU_PATIENCE, 0.5, schedule="plateau", gamma=0.5) == 1.0
    assert _lr_after(PLATEAU_PATIENCE + 2, 0.5, schedule="plateau", gamma=0.5) == pytest.approx(0.5)
    assert _lr_after(PLATEAU_PATIENCE + 2, None, schedule="plateau", gamma=0.5) == pytest.approx(0.5)
    assert _lr_after(2, None, schedule="step", step_size=2, gamma=0.1) == pytest.approx(0.1)
    assert _lr_after(4, None, schedule="cosine", epochs=4) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="gamma"):
        _lr_after(1, None, schedule="plateau", gamma=1.0)


def test_checkpoints_point_to_the_latest_and_load_as_a_model(tmp_path) -> None:
    store = open_store(str(tmp_path))
    run = begin_run(store, "train", "r")
    assert latest_checkpoint(run, "d1") is None
    torch.manual_seed(0)
    net = build("zfnet-small")
    state = {"model": net.state_dict(), "epoch": 1, "step": 5, "rng": {"torch": torch.get_rng_state()}}
    first = save_checkpoint(run, epoch_key(1), state, "d1")
    final = save_checkpoint(run, FINAL, {**state, "epoch": 2, "step": 10}, "d1")
    assert first["key"] == "checkpoints/epoch-0001.pt" and store.exists(run.key(first["key"]))
    assert latest_checkpoint(run, "d1") == final == store.get_json(run.key(LATEST))
    assert final["bytes"] == len(store.get_bytes(run.key(FINAL)))
    assert latest_checkpoint(run, "another spec") is None
    assert load_checkpoint(run, FINAL)["step"] == 10
    # The final checkpoint is a model for every other job (atlas, analyses).
    model, fingerprint = load_model(ModelSpec(arch="zfnet-small", checkpoint=store.uri_of(run.key(FINAL))))
    assert fingerprint == final["sha256"]
    assert torch.equal(model.features.conv1.weight, net.features.conv1.weight)


def test_evolution_strips_hold_every_epoch(tmp_path) -> None:
    torch.manual_seed(0)
    net = build("zfnet-small")
    source = ProceduralSource(12, 64)
    batch = source.read(range(12))
    probe = to_device(batch.images, torch.device("cpu"))
    ids = [source.image_id(i) for i in range(12)]
    channels = select_channels(net, 3)
    assert channels["conv1"] == [0, 16, 31] and set(channels) == set(net.config.conv_names)
    run = begin_run(open_store(str(tmp_path)), "train", "evo")
    rows = []
    for epoch in (1, 2, 5):
        items = snapshot(net, probe, ids, list(range(12)), channels, batch_size=5)
        assert len(items) == 15
        rows += write_snapshot(run, epoch, items)
        with torch.no_grad():
            net.features.conv1.weight.mul_(0.5)
    table = conform(pa.Table.from_pylist(rows), EVOLUTION_SCHEMA)
    assert table.num_rows == 45
    row = next(r for r in rows if r["layer"] == "conv2" and r["channel"] == 0 and r["epoch"] == 2)
    tile = np.asarray(Image.open(io.BytesIO(run.store.get_bytes(row["projection_key"]))))
    assert tile.shape == (row["box_height"], row["box_width"], 3)
    assert net.features.conv1.weight.requires_grad and net.training
    panels = write_strips(run, rows)
    # Fig. 4's layout: a row per channel, a column per epoch, each cell the layer's largest tile
    # enlarged by a whole factor to about DISPLAY_SIDE pixels.
    conv1 = [r for r in rows if r["layer"] == "conv1"]
    ch, cw = max(r["box_height"] for r in conv1), max(r["box_width"] for r in conv1)
    f = -(-DISPLAY_SIDE // max(ch, cw))
    assert f > 1
    panel = Image.open(io.BytesIO(run.store.get_bytes(panels["conv1"])))
    assert panel.size == (3 * (cw * f + 2) + 2, 3 * (ch * f + 2) + 2)
    strip = Image.open(io.BytesIO(run.store.get_bytes(run.key("evolution/conv1/0016/strip.png"))))
    assert strip.size == (3 * (cw * f + 2) + 2, ch * f + 4)
