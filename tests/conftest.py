"""Shared fixtures. Servers (Ray cluster, S3 endpoint) are started once per test session and bind
127.0.0.1 only; see tests/fixtures/."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tests.fixtures.atlases import real_atlases, resnet_runs  # noqa: E402,F401
from tests.fixtures.models import trained_small  # noqa: E402,F401
from tests.fixtures.ray_cluster import ray_cluster  # noqa: E402,F401
from tests.fixtures.s3 import s3_bucket, s3_endpoint  # noqa: E402,F401
