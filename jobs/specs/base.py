"""What every job spec is made of: the shared fields (model, dataset, resources, output) and the
field checks the kinds' own specs use.

Every model forbids unknown fields (a misspelled field is an error, not a silently ignored
default), and every validation problem is reported as ``field.path: reason`` with the path as it
appears in the spec file, so ``zfatlas validate`` output points straight at the line to fix. Each
job kind declares its own spec class beside its runner (``jobs/<kind>/spec.py``); the table of
kinds is :mod:`jobs.kinds`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from jobs.store.base import RESERVED_SUFFIXES
from jobs.uris import parse_uri
from zfcore import architectures
from zfcore.network import Preprocess

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
            close = difflib.get_close_matches(value, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown = ", ".join(names) if len(names) <= 12 else (
                f"{', '.join(names[:12])}, ... ({len(names)} layers: zfatlas layers {model.arch} lists them)"
            )
            raise ValueError(f"unknown layer {value!r}{hint}; model {model.arch!r} has {shown}")
    return value


LayerName = Annotated[str, AfterValidator(_layer)]


def unique(values: list[Any]) -> list[Any]:
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} is listed twice")
        seen.add(v)
    return values


def field_error(field: str, message: str) -> PydanticCustomError:
    """An error raised by a model validator that still names the field it is about (pydantic
    reports model-level errors at the model's own path)."""
    return PydanticCustomError("spec_field", message.replace("{", "{{").replace("}", "}}"), {"field": field})


def fill_default_layers(spec: BaseModel, field: str, default: list[str]) -> None:
    """Set ``field`` to ``default`` (the architecture's choice) unless the spec names its layers;
    layers the user wrote down are validated strictly, each against the model's real layers."""
    if field not in spec.model_fields_set:
        setattr(spec, field, list(default))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")



def _not_a_boolean(value: Any) -> Any:
    # YAML's `k: true` would otherwise be taken as 1 (pydantic's lax int accepts booleans).
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not {str(value).lower()}")
    return value


#: Numbers in specs: what pydantic's int and float take, except booleans.
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
#: Seeds go to torch.manual_seed, numpy and random: non-negative 64-bit values all three take.
MAX_SEED = 2**63 - 1


# --- shared parts ---------------------------------------------------------------------------


class PreprocessSpec(Strict):
    """How images are prepared for the network; every field defaults to the architecture's."""

    image_size: Int | None = Field(
        None, ge=16, le=4096, description="Side of the square center crop fed to the network."
    )
    resize: Int | None = Field(
        None,
        ge=16,
        le=8192,
        description="Short side images are resized to before the crop (ImageNet models: 256 for a "
        "224 crop); default: the architecture's, else image_size.",
    )
    mean: list[Float] | None = Field(
        None, min_length=1, max_length=4, description="Per-channel mean subtracted from [0, 1] pixels."
    )
    std: list[Float] | None = Field(
        None, min_length=1, max_length=4, description="Per-channel std the pixels are divided by."
    )

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        for i, v in enumerate(value or []):
            if not v > 0:
                raise ValueError(f"std must be positive (item {i} is {v})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessSpec:
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise field_error("std", f"{len(self.std)} values for {len(self.mean)} mean values")
        if self.resize is not None and self.image_size is not None and self.resize < self.image_size:
            raise field_error("resize", f"{self.resize} is smaller than the {self.image_size}px crop")
        return self


class ModelSpec(Strict):
    """Which network: an architecture (zfcore.architectures), optionally with weights."""

    arch: str = Field(
        "zfnet-small",
        validation_alias=AliasChoices("arch", "variant"),  # "variant": its name before 0.2
        description="zfnet, zfnet-small, table3-* (ZFNet and the paper's variants); torchvision:<model> "
        "(any torchvision classification model, e.g. torchvision:resnet50); or package.module:factory "
        "(your own: a callable taking num_classes and returning an nn.Module, importable where the "
        "job runs).",
    )
    num_classes: Int | None = Field(
        None,
        ge=1,
        description="Classifier width; default: the checkpoint's, else the dataset's class count "
        "when training, else the architecture's.",
    )
    checkpoint: Location | None = Field(
        None,
        description="Weights: a path, file:// or s3:// URI of a state_dict (bare, or under 'state_dict' "
        "or 'model', DDP's 'module.' prefix allowed) saved with torch.save, or a .safetensors file.",
    )
    preprocess: PreprocessSpec = Field(default_factory=PreprocessSpec)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        try:
            architectures.get(value)
        except architectures.ArchitectureError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _fits(self) -> ModelSpec:
        arch = architectures.get(self.arch)
        channels = arch.preprocess.channels
        for name in ("mean", "std"):
            given = getattr(self.preprocess, name)
            if given is not None and len(given) != channels:
                message = f"{len(given)} values for the {channels}-channel input"
                raise field_error(f"preprocess.{name}", message)
        if self.preprocess.image_size is not None:
            try:
                arch.at(self.preprocess.image_size)
            except architectures.ArchitectureError as exc:
                raise field_error("preprocess.image_size", str(exc)) from None
        return self

    @property
    def config(self) -> architectures.Architecture:
        """The architecture as this spec configures it: described at the spec's image size, its
        classifier width overridden by ``num_classes`` when given."""
        arch = architectures.get(self.arch)
        if self.preprocess.image_size:
            arch = arch.at(self.preprocess.image_size)
        return dataclasses.replace(arch, num_classes=self.num_classes) if self.num_classes else arch

    def preprocessing(self, image_size: int | None = None) -> Preprocess:
        """The preprocessing images get: the architecture's, with this spec's overrides, at
        ``image_size`` when given (a dataset's own override)."""
        base = architectures.get(self.arch).preprocess
        p = self.preprocess
        size = image_size or p.image_size or base.image_size
        resize = p.resize or (base.resize if size == base.image_size else None)
        return Preprocess(
            size,
            tuple(p.mean) if p.mean is not None else base.mean,
            tuple(p.std) if p.std is not None else base.std,
            resize,
        )

    def layer_names(self) -> list[str]:
        return self.config.layer_names

    @property
    def image_size(self) -> int:
        return self.config.image_size


class DatasetSpec(Strict):
    """Where images come from. Images are resized (short side) and center-cropped to image_size."""

    format: Literal["procedural", "imagefolder", "parquet", "webdataset"] = Field(
        "procedural",
        description="procedural: generated shapes (zfcore.data); imagefolder: class/xxx.jpg tree; "
        "parquet: file or folder with an image-bytes column and a label column (also the layout "
        "Hugging Face datasets writes); webdataset: .tar shards of image + .cls/.json label members "
        "(one .tar, a folder, or a folder/name-prefix).",
    )
    uri: Location | None = Field(
        None,
        validate_default=True,
        description="Dataset location (path, file:// or s3://); required unless procedural.",
    )
    num_images: Int = Field(
        2000, ge=1, le=10**9, description="Number of generated images (procedural only; at most 10^9)."
    )
    image_size: Int | None = Field(
        None, ge=16, le=4096, description="Side of the square input; default: the model's image_size."
    )
    image_column: str = Field("image", description="Parquet column holding encoded image bytes.")
    label_column: str = Field(
        "label",
        description="Parquet column holding the class (int or string); for webdataset, the .json "
        "field holding it when a sample has no .cls member.",
    )
    id_column: str | None = Field(
        None,
        description="Parquet column with a unique image id (default: the one a packed file names, "
        "else 'file:row'); for webdataset, the .json field holding it (default: 'id' when present, "
        "else the sample key).",
    )
    limit: Int | None = Field(None, ge=1, description="Use only the first N images of the stable order.")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="Generator seed (procedural only).")

    @field_validator("uri")
    @classmethod
    def _uri_matches_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if fmt == "procedural" and value is not None:
            raise ValueError("procedural datasets are generated and take no uri")
        if fmt in ("imagefolder", "parquet", "webdataset") and value is None:
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


class ResourcesSpec(Strict):
    """How much of the cluster a job uses."""

    workers: Int = Field(2, ge=1, le=1024, description="Number of Ray workers (actors).")
    gpus_per_worker: Float = Field(
        1.0, ge=0, le=64, description="GPUs per worker; used only when the cluster has GPUs."
    )
    cpus_per_worker: Float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker.")
    batch_size: Int = Field(64, ge=1, le=4096, description="Images per forward pass per worker.")


class SpecBase(Strict):
    """Fields every job kind shares."""

    name: str = Field(..., min_length=1, max_length=64, description="Job name (slug: a-z, 0-9, '-', '_').")
    seed: Int = Field(0, ge=0, le=MAX_SEED, description="Seed for everything random in the job.")
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
        if value is not None and value.endswith(RESERVED_SUFFIXES):
            raise ValueError(f"{value!r} ends in a suffix the artifact store reserves "
                             f"({', '.join(RESERVED_SUFFIXES)})")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError(f"{value!r} is not an endpoint URL like http://host:port")
        return value

    @model_validator(mode="after")
    def _image_size_fits(self) -> SpecBase:
        if self.dataset.image_size is not None:
            try:
                architectures.get(self.model.arch).at(self.dataset.image_size)
            except architectures.ArchitectureError as exc:
                raise field_error("dataset.image_size", str(exc)) from None
        return self

    @property
    def image_size(self) -> int:
        """Side of the images fed to the model: the dataset's override or the model's own."""
        return self.dataset.image_size or self.model.image_size

    @property
    def preprocess(self) -> Preprocess:
        """How this job's images are prepared: the model's preprocessing at :attr:`image_size`."""
        return self.model.preprocessing(self.dataset.image_size)
