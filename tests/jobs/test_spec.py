"""Job specs: examples validate, bad specs exit 2 naming the field, overrides, schemas, run ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.analyses.correspondence.spec import CorrespondenceSpec
from jobs.analyses.invariance.spec import InvarianceSpec
from jobs.analyses.probe.spec import ProbeSpec
from jobs.atlas.spec import AtlasSpec
from jobs.kinds import KINDS, load_spec, parse_spec, schema
from jobs.specs.base import SpecError
from jobs.specs.loading import apply_overrides, spec_run_id
from zfatlas_cli.main import main

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_there_is_an_example_of_every_kind() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in EXAMPLES}
    assert kinds == set(KINDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = load_spec(path)
    assert spec.model.arch == ("torchvision:resnet18" if "resnet18" in path.name else "zfnet-small")
    code, out, err = _cli(capsys, "validate", str(path))
    assert code == 0, err
    # The normalized output is itself a valid spec, equal to the original.
    assert parse_spec(yaml.safe_load(out)) == spec
    assert spec_run_id(load_spec(out)) == spec_run_id(spec)


def test_validate_as_a_subprocess() -> None:
    # The installed console script, as a user runs it: the exit code is the process's.
    exe = Path(sys.executable).with_name("zfatlas")
    bad = subprocess.run(
        [exe, "validate", str(EXAMPLES[0]), "--set", "k=101"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["k: Input should be less than or equal to 100 (got 101)"]


BAD_SPECS = [
    # (what, changes to a valid atlas spec, field path named in the error)
    ("wrong type", {"k": "nine"}, "k"),
    ("k=0", {"k": 0}, "k"),
    ("k=101", {"k": 101}, "k"),
    ("out of range nested", {"resources": {"batch_size": 0}}, "resources.batch_size"),
    ("negative workers", {"resources": {"workers": -1}}, "resources.workers"),
    ("unknown layer", {"layers": ["conv1", "conv7"]}, "layers.1"),
    ("fc8 is not scannable", {"layers": ["fc8"]}, "layers.0"),
    ("duplicate layer", {"layers": ["conv1", "conv1"]}, "layers"),
    ("unsupported output scheme", {"output": "gs://bucket/x"}, "output"),
    (
        "unsupported dataset scheme",
        {"dataset": {"format": "imagefolder", "uri": "http://x/y"}},
        "dataset.uri",
    ),
    ("unsupported checkpoint scheme", {"model": {"checkpoint": "hdfs://x/y.pt"}}, "model.checkpoint"),
    ("bad bucket", {"output": "s3://Bad_Bucket/x"}, "output"),
    ("uri missing", {"dataset": {"format": "parquet"}}, "dataset.uri"),
    ("misspelled field", {"kk": 9}, "kk"),
    ("misspelled nested field", {"resources": {"gpus": 1}}, "resources.gpus"),
    ("unknown arch", {"model": {"arch": "alexnet"}}, "model.arch"),
    ("unknown arch by its old name", {"model": {"variant": "zfnet-tiny"}}, "model.variant"),
    ("bad enum", {"precision": "fp16"}, "precision"),
    ("bad name", {"name": "Has Spaces"}, "name"),
    ("bad run id", {"run_id": "../escape"}, "run_id"),
    ("bad endpoint", {"endpoint_url": "127.0.0.1:9000"}, "endpoint_url"),
    ("procedural with uri", {"dataset": {"uri": "/data"}}, "dataset.uri"),
    ("num_images of 10^12", {"dataset": {"num_images": 10**12}}, "dataset.num_images"),
    ("webdataset without uri", {"dataset": {"format": "webdataset"}}, "dataset.uri"),
    ("seed of 10^30", {"seed": 10**30}, "seed"),
    ("negative seed", {"seed": -1}, "seed"),
    ("negative dataset seed", {"dataset": {"seed": -3}}, "dataset.seed"),
    ("k: true", {"k": True}, "k"),
    ("workers: true", {"resources": {"workers": True}}, "resources.workers"),
    ("run id with the lease suffix", {"run_id": "nightly.lease"}, "run_id"),
    ("run id with the temp suffix", {"run_id": "x.zfatlas-tmp"}, "run_id"),
    ("image_size too small", {"layers": ["conv5"], "dataset": {"image_size": 16}}, "dataset.image_size"),
    # zfnet-small's fc6 is sized for 64 px: at 224 only its conv layers exist.
    ("fc layer at a size it does not fit",
     {"model": {"arch": "zfnet-small", "preprocess": {"image_size": 224, "resize": 256}}, "layers": ["fc6"]},
     "layers.0"),
]


@pytest.mark.parametrize("what,changes,field", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_bad_spec_exits_2_naming_the_field(
    what: str, changes: dict, field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"kind": "atlas", "name": "bad", **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = _cli(capsys, "validate", str(path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{field}: "), lines[0]
    assert len(lines[0]) > len(field) + 10  # there is a reason after the path


def test_every_problem_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"kind": "atlas", "name": "x", "k": 0, "shard_size": "big", "typo": 1}))
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2
    assert sorted(line.split(":")[0] for line in err.splitlines()) == ["k", "shard_size", "typo"]
    assert "unknown field" in err and "greater than or equal to 1" in err


@pytest.mark.parametrize(
    "text,reason",
    [
        ("kind: atlas\nname: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("kind: atlas\nname: x\nk: 3\nk: 4\n", "duplicate key 'k'"),
        ("name: x\n", "kind: required"),
        ("kind: atlass\nname: x\n", "did you mean 'atlas'"),
        ("kind: [atlas]\nname: x\n", "kind: unknown kind"),
        ('{"kind": "atlas", "name": "x", "k": 1, "k": 2}', "duplicate key 'k'"),
        ('{"kind": "atlas", "name": "x"', "not valid YAML"),
    ],
)
def test_unreadable_specs_exit_2(text: str, reason: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and reason in err


def test_json_spec_with_tabs(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{\n\t"kind": "atlas",\n\t"name": "tabs",\n\t"k": 4\n}\n')
    assert load_spec(path).k == 4
    path.write_text('{"kind": "atlas",, }')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(path)


def test_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    code, _, err = _cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err and "cannot read" in err


def test_overrides(capsys, tmp_path: Path) -> None:
    example = str(next(p for p in EXAMPLES if p.name == "atlas-small.yaml"))
    code, out, _ = _cli(
        capsys,
        "validate",
        example,
        "--set",
        "k=16",
        "--set",
        "layers=[conv2, conv3]",
        "--set",
        "resources.workers=4",
    )
    assert code == 0
    spec = yaml.safe_load(out)
    assert spec["k"] == 16 and spec["layers"] == ["conv2", "conv3"] and spec["resources"]["workers"] == 4
    # Overrides are validated like the file.
    code, _, err = _cli(capsys, "validate", example, "--set", "layers.0=conv9")
    assert code == 2 and err.startswith("layers.0: unknown layer 'conv9'")
    code, _, err = _cli(capsys, "validate", example, "--set", "resources.gpus=2")
    assert code == 2 and err.startswith("resources.gpus: unknown field")
    code, _, err = _cli(capsys, "validate", example, "--set", "no-equals-sign")
    assert code == 2 and "field.path=value" in err

    assert apply_overrides({"a": {"b": [1, 2]}}, ["a.b.1=x", "c.d=3", "e=null", "f=1.5"]) == {
        "a": {"b": [1, "x"]},
        "c": {"d": 3},
        "e": None,
        "f": 1.5,
    }
    with pytest.raises(SpecError, match="past the end"):
        apply_overrides({"a": [1]}, ["a.3=2"])


def test_run_override_is_validated_before_running(capsys) -> None:
    code, _, err = _cli(capsys, "run", str(EXAMPLES[0]), "--set", "k=0")
    assert code == 2 and err.startswith("k: ")


@pytest.mark.parametrize("kind", [*KINDS, "all"])
def test_schema(kind: str, capsys) -> None:
    code, out, _ = _cli(capsys, "schema", kind)
    assert code == 0
    doc = json.loads(out)
    if kind == "all":
        assert set(doc["discriminator"]["mapping"]) == set(KINDS)
    else:
        assert doc["properties"]["kind"]["const"] == kind
        assert doc["additionalProperties"] is False
        assert "name" in doc["required"]
        assert "zfcore.architectures" in doc["$defs"]["ModelSpec"]["description"]
    assert schema(kind if kind != "all" else None) == doc


def test_schema_unknown_kind(capsys) -> None:
    code, out, err = _cli(capsys, "schema", "nope")
    assert code == 2 and out == "" and err.startswith("kind: unknown kind")


def test_run_id_is_stable_and_ignores_where_it_is_stored() -> None:
    a = parse_spec({"kind": "atlas", "name": "x"})
    b = parse_spec({"kind": "atlas", "name": "x", "k": 9, "output": "s3://bucket/p", "layers": a.layers})
    c = parse_spec({"kind": "atlas", "name": "x", "k": 8})
    assert spec_run_id(a) == spec_run_id(b) != spec_run_id(c)
    assert spec_run_id(a).startswith("x-") and len(spec_run_id(a)) == len("x-") + 10
    assert spec_run_id(parse_spec({"kind": "atlas", "name": "x", "run_id": "mine"})) == "mine"


def test_default_layers_follow_the_model() -> None:
    assert AtlasSpec(name="a").layers == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    no34 = {"arch": "table3-no-conv3-4"}
    assert parse_spec({"kind": "atlas", "name": "a", "model": no34}).layers == ["conv1", "conv2", "conv5"]
    assert parse_spec({"kind": "probe", "name": "a", "model": no34}).layers == [
        "conv1",
        "conv2",
        "conv5",
        "fc6",
        "fc7",
    ]
    nofc = {"variant": "table3-no-fc6-7"}  # the field's old name still works
    assert parse_spec({"kind": "invariance", "name": "a", "model": nofc}).layers == ["conv1"]
    assert isinstance(parse_spec({"kind": "probe", "name": "p"}), ProbeSpec)
    # Written-out layers are checked strictly against the model.
    with pytest.raises(SpecError, match=r"layers\.1: unknown layer 'conv3'"):
        parse_spec({"kind": "atlas", "name": "a", "model": no34, "layers": ["conv1", "conv3"]})


def test_kind_specific_checks() -> None:
    def problems(data: dict) -> list[str]:
        with pytest.raises(SpecError) as info:
            parse_spec(data)
        return info.value.problems

    assert problems({"kind": "occlusion", "name": "o", "patch": 65}) == [
        "patch: 65 is larger than the 64px images"
    ]
    assert problems({"kind": "occlusion", "name": "o", "layer": "fc9"})[0].startswith("layer: unknown layer")
    assert problems({"kind": "invariance", "name": "i", "translations": [0, 70]})[0].startswith(
        "translations.1:"
    )
    assert problems({"kind": "invariance", "name": "i", "scales": [0]})[0].startswith("scales:")
    base = {"kind": "correspondence", "name": "c", "images": ["a", "b"]}
    assert problems({**base, "parts": {"eye": [[0, 0, 4, 4]]}})[0].startswith(
        "parts.eye: 1 boxes for 2 images"
    )
    assert problems({**base, "parts": {"eye": [[0, 0, 4, 4], [60, 0, 8, 8]]}})[0].startswith("parts.eye.1:")
    assert problems({**base, "parts": {"eye": [[0, 0, 4]]}})[0].startswith("parts.eye.0")
    folder = {"format": "imagefolder", "uri": "/data"}
    assert problems({"kind": "correspondence", "name": "c", "dataset": folder})[0].startswith(
        "images: required"
    )
    assert problems({"kind": "atlas", "name": "a", "dataset": {**folder, "num_images": 10}})[0].startswith(
        "dataset.num_images: only used by format 'procedural'"
    )
    assert problems({"kind": "train", "name": "t", "evolution_epochs": [0]})[0].startswith(
        "evolution_epochs:"
    )
    assert problems({"kind": "train", "name": "t", "momentum": 1.0})[0].startswith("momentum:")
    ok = parse_spec({**base, "parts": {"eye": [[0, 0, 4, 4], [1, 1, 4, 4]]}})
    assert isinstance(ok, CorrespondenceSpec) and ok.parts["eye"][1] == (1, 1, 4, 4)
    assert isinstance(parse_spec({"kind": "invariance", "name": "i"}), InvarianceSpec)


def test_spec_helpers() -> None:
    spec = parse_spec({"kind": "atlas", "name": "a", "dataset": {"image_size": 96}})
    assert spec.image_size == 96 and spec.model.image_size == 64
    assert spec.model.layer_names()[-1] == "fc7"
    assert (
        parse_spec({"kind": "atlas", "name": "a", "model": {"num_classes": 5}}).model.config.num_classes == 5
    )
    text = "kind: atlas\nname: inline\n"
    assert load_spec(text).name == "inline"
    assert load_spec(text, ["k=3"]).k == 3
