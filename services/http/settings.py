"""Settings of the HTTP API: one class, read from arguments or ``ZFATLAS_API_*`` environment
variables, validated when created so a bad configuration fails at start, not at the first request.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.uris import parse_uri

MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
