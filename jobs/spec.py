"""Job specs: one pydantic model per job kind, one discriminated union, loaded from YAML or JSON.

Every model forbids unknown fields (a misspelled field is an error, not a silently ignored
default), and every validation problem is reported as ``field.path: reason`` with the path as it
appears in the spec file, so ``zfatlas validate`` output points straight at the line to fix.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from jobs.uris import parse_uri
from zfcore.model import VARIANTS, ZFNetConfig

KINDS = ("train", "atlas", "occlusion", "invariance", "correspondence", "probe")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-_]*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SpecError(Exception):
    """A spec that cannot be used; ``problems`` holds one ``field.path: reason`` line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# --- field checks ---------------------------------------------------------------------------


def _location(value: str | None) -> str | None:
    if value is not None:
        parse_uri(value)  # raises ValueError with the reason
    return value


Location = Annotated[str, AfterValidator(_location)]


def _layer(value: str, info: ValidationInfo) -> str:
    # Runs per list item, so an error is reported at ``layers.N``. ``model`` is declared before
    # every layer field and so is already validated here; if it failed, its own error is reported.
    model = info.data.get("model")
    if isinstance(model, ModelSpec):
        names = model.layer_names()
        if value not in names:
            raise ValueError(f"unknown layer {value!r}; model {model.variant!r} has {', '.join(names)}")
    return value


LayerName = Annotated[str, AfterValidator(_layer)]


def _unique(values: list[Any]) -> list[Any]:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} is listed twice")
        seen.add(v)
    return values


def _field_error(field: str, message: str) -> PydanticCustomError:
    """An error raised by a model validator that still names the field it is about (pydantic
    reports model-level errors at the model's own path)."""
    return PydanticCustomError("spec_field", message.replace("{", "{{").replace("}", "}}"), {"field": field})


def _fill_default_layers(spec: BaseModel, field: str, model: ModelSpec) -> None:
    # Defaults name the paper's layers; a variant without some of them (Table 3 ablations) keeps
    # the ones it has, while layers the user wrote down are validated strictly.
    if field not in spec.model_fields_set:
        wanted = getattr(spec, field)
        present = set(model.layer_names())
        setattr(spec, field, [name for name in wanted if name in present])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- shared parts ---------------------------------------------------------------------------


class ModelSpec(_Strict):
    """Which network: a configuration from zfcore.model.VARIANTS, optionally with weights."""

    variant: str = Field(
        "zfnet-small",
        description="Architecture name from zfcore.model.VARIANTS.",
        json_schema_extra={"enum": sorted(VARIANTS)},
    )
    num_classes: int | None = Field(
        None,
        ge=1,
        description="Classifier width; default: the checkpoint's, else the dataset's class count "
        "when training, else the variant's.",
    )
    checkpoint: Location | None = Field(
        None, description="Checkpoint file to load weights from: a path, file:// or s3:// URI."
    )

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str) -> str:
        if value not in VARIANTS:
            close = difflib.get_close_matches(value, VARIANTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown model variant {value!r}{hint}; known: {', '.join(sorted(VARIANTS))}")
        return value

    @property
    def config(self) -> ZFNetConfig:
        config = VARIANTS[self.variant]
        return config.replace(num_classes=self.num_classes) if self.num_classes else config

    def layer_names(self) -> list[str]:
        return list(VARIANTS[self.variant].layer_names)

    @property
    def image_size(self) -> int:
        return VARIANTS[self.variant].image_size


class DatasetSpec(_Strict):
    """Where images come from. Images are resized (short side) and center-cropped to image_size."""

    format: Literal["procedural", "imagefolder", "parquet"] = Field(
        "procedural",
        description="procedural: generated shapes (zfcore.data); imagefolder: class/xxx.jpg tree; "
        "parquet: file or folder with an image-bytes column and a label column.",
    )
    uri: Location | None = Field(
        None,
        validate_default=True,
        description="Dataset location (path, file:// or s3://); required unless procedural.",
    )
    num_images: int = Field(2000, ge=1, description="Number of generated images (procedural only).")
    image_size: int | None = Field(
        None, ge=16, le=4096, description="Side of the square input; default: the model's image_size."
    )
    image_column: str = Field("image", description="Parquet column holding encoded image bytes.")
    label_column: str = Field("label", description="Parquet column holding the class (int or string).")
    id_column: str | None = Field(
        None, description="Parquet column with a unique image id; default: 'file:row'."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N images of the stable order.")
    seed: int = Field(0, description="Generator seed (procedural only).")

    @field_validator("uri")
    @classmethod
    def _uri_matches_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if fmt == "procedural" and value is not None:
            raise ValueError("procedural datasets are generated and take no uri")
        if fmt in ("imagefolder", "parquet") and value is None:
            raise ValueError(f"required for format {fmt!r}")
        return value

    @field_validator("num_images", "seed")
    @classmethod
    def _procedural_only(cls, value: int, info: ValidationInfo) -> int:
        # Only a non-default value is a mistake: a normalized spec (every field written out)
        # must validate again.
        fmt = info.data.get("format")
        default = cls.model_fields[info.field_name].default
        if fmt is not None and fmt != "procedural" and value != default:
            hint = "; use limit to cap other formats" if info.field_name == "num_images" else ""
            raise ValueError(f"only used by format 'procedural', not {fmt!r}{hint}")
        return value


class ResourcesSpec(_Strict):
    """How much of the cluster a job uses."""

    workers: int = Field(2, ge=1, le=1024, description="Number of Ray workers (actors).")
    gpus_per_worker: float = Field(
        1.0, ge=0, le=64, description="GPUs per worker; used only when the cluster has GPUs."
    )
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per forward pass per worker.")


class SpecBase(_Strict):
    """Fields every job kind shares."""

    name: str = Field(..., min_length=1, max_length=64, description="Job name (slug: a-z, 0-9, '-', '_').")
    seed: int = Field(0, description="Seed for everything random in the job.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    output: Location = Field(
        "./artifacts", description="Artifact store: a path, file:// or s3://bucket/prefix."
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (e.g. http://127.0.0.1:9000); default: AWS_ENDPOINT_URL "
        "or AWS. Credentials always come from the environment, never from the spec.",
    )
    run_id: str | None = Field(
        None,
        max_length=128,
        description="Run id; default: name plus a hash of the spec, so the same spec is the same run.",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.match(value):
            raise ValueError(f"{value!r} is not a slug: use lowercase letters, digits, '-' and '_'")
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_ID.match(value):
            raise ValueError(f"{value!r} is not a valid run id: use letters, digits, '.', '-', '_'")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"{value!r} is not an endpoint URL like http://host:port")
        return value

    @property
    def image_size(self) -> int:
        """Side of the images fed to the model: the dataset's override or the model's own."""
        return self.dataset.image_size or self.model.image_size


# --- job kinds ------------------------------------------------------------------------------

_CONV = ["conv1", "conv2", "conv3", "conv4", "conv5"]


class TrainSpec(SpecBase):
    """Train a ZFNet with the paper's recipe (SGD, momentum, filter renormalization)."""

    kind: Literal["train"] = "train"
    epochs: int = Field(10, ge=1, le=10_000)
    lr: float = Field(0.01, gt=0, le=10, description="Initial learning rate (paper: 1e-2).")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["step", "plateau", "cosine"] = Field(
        "step",
        description="step: multiply lr by gamma every step_size epochs; plateau: when "
        "validation error stops improving (the paper's manual annealing); cosine: to 0.",
    )
    step_size: int = Field(30, ge=1, description="Epochs between lr steps (schedule 'step').")
    gamma: float = Field(0.1, gt=0, le=1, description="lr multiplier at each step / plateau.")
    renorm_radius: float | None = Field(
        0.1, gt=0, description="Renormalize conv filters whose RMS exceeds this (paper: 0.1); null: off."
    )
    checkpoint_every_epochs: int = Field(1, ge=1)
    evolution_epochs: list[int] = Field(
        [1, 2, 5, 10, 20, 30, 40, 64],
        description="Epochs at which to snapshot top activations (Fig. 4); those beyond epochs are skipped.",
    )
    evolution_channels: int = Field(8, ge=1, description="Channels per layer tracked for Fig. 4.")
    probe_images: int = Field(64, ge=1, description="Fixed images scanned at each evolution epoch.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the dataset held out.")
    augment: bool = Field(True, description="Random crops and horizontal flips.")
    precision: Literal["fp32", "bf16"] = "fp32"
    max_failures: int = Field(2, ge=0, description="Worker failures tolerated (resume from checkpoint).")

    @field_validator("evolution_epochs")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        for i, epoch in enumerate(value):
            if epoch < 1:
                raise ValueError(f"epoch numbers start at 1 (item {i} is {epoch})")
        return sorted(_unique(value))


class AtlasSpec(SpecBase):
    """Top-k activations per channel over a dataset, projected to pixels with the deconvnet."""

    kind: Literal["atlas"] = "atlas"
    layers: list[LayerName] = Field(
        default_factory=lambda: list(_CONV), min_length=1, description="Layers to scan."
    )
    k: int = Field(9, ge=1, le=100, description="Top activations kept per channel (paper: 9).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Scan precision; selected images are re-scored and projected in fp32."
    )
    shard_size: int = Field(512, ge=1, description="Images per shard (unit of work and of retry).")
    project: bool = Field(True, description="Deconvnet projections of every top activation.")
    max_retries: int = Field(3, ge=0, description="Retries of a failed shard.")

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @model_validator(mode="after")
    def _default_layers(self) -> AtlasSpec:
        _fill_default_layers(self, "layers", self.model)
        return self


class OcclusionSpec(SpecBase):
    """Occlusion sensitivity (Fig. 7): slide a grey patch and record the response."""

    kind: Literal["occlusion"] = "occlusion"
    layer: LayerName = Field("conv5", description="Layer whose strongest feature map is tracked.")
    patch: int = Field(16, ge=1, description="Occluder side in pixels.")
    stride: int = Field(4, ge=1, description="Occluder step in pixels.")
    images: int = Field(8, ge=1, le=10_000, description="Number of images analysed.")
    fill: Literal["grey", "mean"] = Field("grey", description="Occluder colour.")

    @model_validator(mode="after")
    def _patch_fits(self) -> OcclusionSpec:
        if self.patch > self.image_size:
            # Raised here (not in a field validator) because image_size comes from other fields.
            raise _field_error("patch", f"{self.patch} is larger than the {self.image_size}px images")
        return self


class InvarianceSpec(SpecBase):
    """Invariance curves (Fig. 5): feature distance and class probability under transformations."""

    kind: Literal["invariance"] = "invariance"
    layers: list[LayerName] = Field(
        default_factory=lambda: ["conv1", "fc7"], min_length=1, description="Layers compared."
    )
    images: int = Field(5, ge=1, le=1000, description="Number of images transformed.")
    translations: list[int] = Field(
        default_factory=lambda: list(range(-16, 17, 4)),
        description="Vertical shifts in pixels (the paper's -60..60 at 224px, scaled to 64px).",
    )
    scales: list[float] = Field(
        default_factory=lambda: [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4],
        description="Scale factors.",
    )
    rotations: list[float] = Field(
        default_factory=lambda: [float(d) for d in range(0, 360, 10)], description="Degrees."
    )

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @field_validator("scales")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        for i, s in enumerate(value):
            if not 0 < s <= 10:
                raise ValueError(f"scale factors must be in (0, 10] (item {i} is {s})")
        return value

    @field_validator("rotations")
    @classmethod
    def _degrees(cls, value: list[float]) -> list[float]:
        for i, r in enumerate(value):
            if not -360 <= r <= 360:
                raise ValueError(f"rotations are degrees in [-360, 360] (item {i} is {r})")
        return value

    @model_validator(mode="after")
    def _checks(self) -> InvarianceSpec:
        _fill_default_layers(self, "layers", self.model)
        if not self.layers:
            raise _field_error("layers", f"model {self.model.variant!r} has none of the default layers")
        size = self.image_size
        for i, t in enumerate(self.translations):
            if abs(t) >= size:
                raise _field_error(f"translations.{i}", f"{t} moves the image out of the {size}px frame")
        return self


Box = tuple[int, int, int, int]


class CorrespondenceSpec(SpecBase):
    """Correspondence analysis (Table 1): mask the same part in several images and compare."""

    kind: Literal["correspondence"] = "correspondence"
    layers: list[LayerName] = Field(
        default_factory=lambda: ["conv5", "fc7"], min_length=1, description="Layers compared."
    )
    images: list[str] = Field(
        default_factory=list,
        description="Image ids. Empty with a procedural dataset: the first 5 images, with one part "
        "'object' taken from each image's object box.",
    )
    parts: dict[str, list[Box]] = Field(
        default_factory=dict,
        description="Part name -> one (top, left, height, width) box per image, in the order of images.",
    )
    random_masks: int = Field(5, ge=0, description="Random-mask baselines per image.")
    mask_size: int = Field(12, ge=1, description="Side of the random masks in pixels.")

    @field_validator("images")
    @classmethod
    def _images_unique(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @field_validator("parts")
    @classmethod
    def _boxes(cls, value: dict[str, list[Box]], info: ValidationInfo) -> dict[str, list[Box]]:
        images = info.data.get("images")
        for part, boxes in value.items():
            if images is not None and len(boxes) != len(images):
                raise _field_error(part, f"{len(boxes)} boxes for {len(images)} images; need one per image")
            for i, (top, left, height, width) in enumerate(boxes):
                if top < 0 or left < 0 or height < 1 or width < 1:
                    raise _field_error(f"{part}.{i}", "top and left must be >= 0, height and width >= 1")
        return value

    @model_validator(mode="after")
    def _checks(self) -> CorrespondenceSpec:
        _fill_default_layers(self, "layers", self.model)
        if not self.layers:
            raise _field_error("layers", f"model {self.model.variant!r} has none of the default layers")
        for field in ("images", "parts"):
            if self.dataset.format != "procedural" and not getattr(self, field):
                raise _field_error(field, "required unless the dataset is procedural")
        if self.parts and not self.images:
            raise _field_error("images", "required when parts are given")
        size = self.image_size
        for part, boxes in self.parts.items():
            for i, (top, left, height, width) in enumerate(boxes):
                if top + height > size or left + width > size:
                    raise _field_error(f"parts.{part}.{i}", f"box extends past the {size}px image")
        if self.mask_size > size:
            raise _field_error("mask_size", f"{self.mask_size} is larger than the {size}px images")
        return self


class ProbeSpec(SpecBase):
    """Linear probes (Table 6): classifiers on frozen features of each layer, on another dataset."""

    kind: Literal["probe"] = "probe"
    probe_dataset: DatasetSpec = Field(
        default_factory=lambda: DatasetSpec(num_images=1000, seed=1),
        description="Dataset the probes are trained and tested on (default: procedural, seed 1).",
    )
    layers: list[LayerName] = Field(
        default_factory=lambda: _CONV + ["fc6", "fc7"],
        min_length=1,
        description="Layers probed; default: conv1..conv5, fc6, fc7 where the model has them.",
    )
    train_per_class: list[int] = Field(
        default_factory=lambda: [15, 30], min_length=1, description="Training images per class."
    )
    folds: int = Field(5, ge=1, le=100, description="Random splits averaged.")
    classifiers: list[Literal["softmax", "svm"]] = Field(
        default_factory=lambda: ["softmax", "svm"], min_length=1
    )
    epochs: int = Field(100, ge=1, description="Classifier training epochs.")
    include_random_init: bool = Field(True, description="Also probe an untrained network (baseline).")

    @field_validator("layers", "classifiers")
    @classmethod
    def _no_duplicates(cls, value: list[str]) -> list[str]:
        return _unique(value)

    @field_validator("train_per_class")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        for i, n in enumerate(value):
            if n < 1:
                raise ValueError(f"item {i} is {n}; need at least 1 image per class")
        return _unique(value)

    @model_validator(mode="after")
    def _default_layers(self) -> ProbeSpec:
        _fill_default_layers(self, "layers", self.model)
        return self


JobSpec = Annotated[
    TrainSpec | AtlasSpec | OcclusionSpec | InvarianceSpec | CorrespondenceSpec | ProbeSpec,
    Field(discriminator="kind"),
]
SPEC_TYPES: dict[str, type[SpecBase]] = {
    "train": TrainSpec,
    "atlas": AtlasSpec,
    "occlusion": OcclusionSpec,
    "invariance": InvarianceSpec,
    "correspondence": CorrespondenceSpec,
    "probe": ProbeSpec,
}
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)


# --- parsing --------------------------------------------------------------------------------


def parse_spec(data: dict[str, Any]) -> JobSpec:
    """Validate a spec dict; raises :class:`SpecError` listing every problem."""
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping of fields, got {type(data).__name__}"])
    kind = data.get("kind")
    if kind is None:
        raise SpecError([f"kind: required field is missing; one of {', '.join(KINDS)}"])
    if not isinstance(kind, str) or kind not in SPEC_TYPES:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError([f"kind: unknown kind {kind!r}{hint}; one of {', '.join(KINDS)}"])
    cls = SPEC_TYPES[kind]
    try:
        # Validated with the concrete class so error paths read as in the file ("k", not "atlas.k").
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError([_format_error(cls, err) for err in exc.errors()]) from None


def _format_error(cls: type[BaseModel], err: Any) -> str:
    loc = tuple(err["loc"])
    if field := (err.get("ctx") or {}).get("field"):
        loc = (*loc, *field.split("."))
    path = ".".join(str(p) for p in loc) or "spec"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        reason = "unknown field" + _suggest(cls, loc)
    elif kind == "missing":
        reason = "required field is missing"
    elif kind in ("value_error", "assertion_error", "spec_field"):
        reason = msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg
    else:
        reason = msg
        value = err.get("input")
        if isinstance(value, str | int | float | bool) or value is None:
            reason += f" (got {value!r})"
    return f"{path}: {reason}"


def _suggest(cls: type[BaseModel], loc: tuple[Any, ...]) -> str:
    owner: Any = cls
    for part in loc[:-1]:
        field = owner.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        candidates = [ann, *getattr(ann, "__args__", ())]
        owner = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if owner is None:
            return ""
    name, fields = str(loc[-1]), list(owner.model_fields)
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    close = close or [f for f in fields if name in f or f in name]
    return f" (did you mean {close[0]!r}?)" if close else ""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: YAML would otherwise keep the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_spec_dict(path_or_text: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw mapping of a spec file (YAML or JSON), or of spec text; no validation."""
    source, text = _read(path_or_text)
    if source.lower().endswith(".json") or text.lstrip().startswith("{"):
        # JSON first: YAML rejects some valid JSON (tab indentation) and gives worse messages.
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as exc:
            if source.lower().endswith(".json"):
                raise SpecError(
                    [f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"]
                ) from None
        except ValueError as exc:  # a duplicate key
            raise SpecError([f"{source}: {exc}"]) from None
        else:
            if not isinstance(data, dict):
                raise SpecError([f"{source}: expected a mapping of fields at the top level"])
            return data
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([f"{source}: not valid YAML: {problem}{where}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{source}: expected a mapping of fields at the top level"])
    return data


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(path_or_text, str) and (
        "\n" in path_or_text or ": " in path_or_text or path_or_text.lstrip().startswith("{")
    ):
        return "spec", path_or_text
    path = Path(path_or_text)
    try:
        return str(path), path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([f"{path}: cannot read spec: {reason}"]) from None


def load_spec(path_or_text: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobSpec:
    """Load and validate a spec file or spec text, applying ``field.path=value`` overrides."""
    return parse_spec(apply_overrides(load_spec_dict(path_or_text), overrides))


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b.c=value`` set; values are parsed as YAML (``3`` is an int,
    ``[conv1, conv2]`` a list, ``null`` None). Integer segments index into lists."""
    out = copy.deepcopy(data)
    problems = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        parts = path.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"{item}: expected field.path=value")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced bracket): take it as the literal string
        try:
            _set_path(out, parts, value)
        except (KeyError, IndexError, TypeError) as exc:
            problems.append(f"{path}: cannot set: {exc.args[0]}")
    if problems:
        raise SpecError(problems)
    return out


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise TypeError(f"{where} indexes a list; use a number")
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise IndexError(f"{where} is past the end of a {len(node)}-item list")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise TypeError(f"{'.'.join(parts[:i]) or 'spec'} is a {type(node).__name__}, not a mapping")


def canonical_json(spec: SpecBase) -> str:
    """The spec's identity: its normalized fields, minus where it is stored (output, endpoint_url)
    and the run id itself, as compact sorted JSON."""
    data = spec.model_dump(mode="json", exclude={"run_id", "output", "endpoint_url"})
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def spec_run_id(spec: SpecBase) -> str:
    """``spec.run_id``, or ``{name}-{hash}``: re-running the same spec targets the same run (and so
    no-ops once committed), wherever its output goes."""
    if spec.run_id:
        return spec.run_id
    return f"{spec.name}-{hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:10]}"


def schema(kind: str | None = None) -> dict[str, Any]:
    """JSON Schema of one kind, or of the whole union when ``kind`` is None or "all"."""
    if kind in (None, "all"):
        return _ADAPTER.json_schema()
    if kind not in SPEC_TYPES:
        raise SpecError([f"kind: unknown kind {kind!r}; one of {', '.join(KINDS)}"])
    return SPEC_TYPES[kind].model_json_schema()


def dump_yaml(spec: SpecBase) -> str:
    """The normalized spec as YAML, fields in declaration order with ``kind`` first."""
    data = spec.model_dump(mode="json")
    data = {"kind": data.pop("kind"), **data}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
