"""Settings of the HTTP API: one class, read from arguments or ``ZFATLAS_API_*`` environment
variables, validated when created so a bad configuration fails at start, not at the first request.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from jobs.uris import Location, parse_uri

MIN_TOKEN_LENGTH = 16
# Bind addresses that mean "every interface": they name no host a client would put in Host.
_WILDCARD_BINDS = {"", "0.0.0.0", "::", "[::]"}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a ``Host`` header value, lower-cased, without its port (``[::1]:8000`` ->
    ``[::1]``, ``Example.org:80`` -> ``example.org``)."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end != -1 else value
    if value.count(":") > 1:
        return value  # a bare IPv6 address (a setting; Host headers bracket them): no port to strip
    host, sep, port = value.rpartition(":")
    return host if sep and (port.isdigit() or not port) else value


def _bracketed(host: str) -> str:
    # A bare IPv6 address (a bind address, a setting) as it appears in a Host header.
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _comma_list(value: object) -> object:
    # From the environment: "a.example.org, b.example.org" (JSON lists work too).
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _under(location: Location, prefix: Location) -> bool:
    """Whether ``location`` is ``prefix`` or inside it (by path segments, never by string prefix)."""
    if location.is_s3 != prefix.is_s3:
        return False
    if location.is_s3:
        inner, outer = location.path.split("/"), prefix.path.split("/")
        return location.bucket == prefix.bucket and (not prefix.path or inner[: len(outer)] == outer)
    return location.local_path().resolve().is_relative_to(prefix.local_path().resolve())


class Settings(BaseSettings):
    """Configuration of the HTTP servers (:func:`services.api.app.create_app`, ``zfatlas serve``,
    ``zfatlas scheduler serve``).

    Environment variables: ``ZFATLAS_API_STORE``, ``ZFATLAS_API_ENDPOINT_URL``,
    ``ZFATLAS_API_TOKEN``, ``ZFATLAS_API_HOST``, ... (the field names, upper-cased).
    """

    model_config = SettingsConfigDict(env_prefix="ZFATLAS_API_", extra="forbid", frozen=True)

    store: str = Field("./artifacts", description="Artifact store: a path, file:///path or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3 endpoint URL (MinIO, Ceph, moto, ...).")
    token: SecretStr | None = Field(
        None,
        description="Bearer token for mutating endpoints (submit, schedule). Without one they answer 403.",
    )
    host: str = Field("127.0.0.1", description="Address `zfatlas serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `zfatlas serve` binds (0: any free port).")
    default_page_size: int = Field(100, ge=1, description="Items per page when a request names none.")
    max_page_size: int = Field(500, ge=1, le=10_000, description="Largest page a request may ask for.")
    max_request_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Largest request body accepted (413 above it)."
    )
    cache_runs: int = Field(32, ge=1, le=4096, description="Atlases whose table metadata is kept in memory.")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host header names accepted besides loopback ones (127.0.0.1, localhost, [::1]) and "
        "the bound address, any port: comma-separated; '*.example.org' matches subdomains, '*' any "
        "host. Other Host headers are answered 400 (DNS rebinding).",
    )
    allowed_outputs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Artifact stores (paths or s3:// prefixes) that jobs and schedules submitted over "
        "HTTP may write to besides `store`: comma-separated; '*' allows any.",
    )

    @field_validator("store")
    @classmethod
    def _store_uri(cls, value: str) -> str:
        parse_uri(value)  # ValueError names what is wrong
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        names = []
        for entry in value:
            if not entry or any(ch.isspace() or ch in "/\\@" for ch in entry):
                raise ValueError(f"{entry!r} is not a host name (e.g. atlas.example.org or *.example.org)")
            names.append(entry if entry == "*" else _bracketed(host_name(entry)))
        return names

    @field_validator("allowed_outputs", mode="before")
    @classmethod
    def _split_outputs(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("allowed_outputs")
    @classmethod
    def _outputs(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*":
                parse_uri(entry)  # ValueError names what is wrong
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if len(secret) < MIN_TOKEN_LENGTH:
            raise ValueError(f"the token must have at least {MIN_TOKEN_LENGTH} characters")
        if any(ch.isspace() for ch in secret) or not secret.isprintable():
            raise ValueError("the token must not contain whitespace or control characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_page_size > self.max_page_size:
            raise ValueError(
                f"default_page_size ({self.default_page_size}) is larger than max_page_size "
                f"({self.max_page_size})"
            )
        if not is_loopback(self.host) and self.token is None:
            raise ValueError(
                f"host {self.host!r} is not loopback: set a token (ZFATLAS_API_TOKEN) before "
                "exposing the API beyond this machine"
            )
        return self

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's ``Host`` header names this server: a loopback name, the address it
        binds, or one of ``allowed_hosts`` (any port). A page on another name that resolves to this
        machine (DNS rebinding) gets no answer but 400."""
        if not header:
            return False
        name = host_name(header)
        if is_loopback(name):
            return True
        bound = _bracketed(self.host.strip().lower())
        if bound not in _WILDCARD_BINDS and name == bound:
            return True
        for entry in self.allowed_hosts:
            if entry == "*" or name == entry:
                return True
            if entry.startswith("*.") and name.endswith(entry[1:]):
                return True
        return False

    def output_allowed(self, uri: str) -> bool:
        """Whether a job submitted over HTTP may write to ``uri``: inside ``store`` or one of
        ``allowed_outputs`` (local paths compared after resolving links and ``..``)."""
        if "*" in self.allowed_outputs:
            return True
        location = parse_uri(uri)
        return any(_under(location, parse_uri(prefix)) for prefix in [self.store, *self.allowed_outputs])
