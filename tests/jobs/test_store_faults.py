"""The artifact store under hostile or unusual conditions (issue 13): symbolic links out of a local
store, file permissions under the umask, missing and read-only folders, and an S3 endpoint that
must not be sent credentials (a plain loopback listener shows that nothing reaches it)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest

from jobs.kinds import parse_spec
from jobs.runner import run_spec
from jobs.store import LocalStore, MissingKeyError, StoreError, open_store
from jobs.store.local import LinkOutsideStoreError, StoreNotFoundError
from jobs.store.s3 import ENDPOINTS_ENV, EndpointNotAllowedError, endpoint_allowed, trust_endpoint
from tests.fixtures.listener import Listener

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def linked(tmp_path) -> LocalStore:
    """A store whose folder ``r`` holds a real file and links: to a file and a folder outside the
    store, and to a file inside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(SECRET)
    store = LocalStore(tmp_path / "store")
    store.put_bytes("r/real.png", b"png")
    run = tmp_path / "store" / "r"
    (run / "evil.png").symlink_to(outside / "passwd")
    (run / "dir").symlink_to(outside, target_is_directory=True)
    (run / "alias.png").symlink_to("real.png")
    (tmp_path / "store" / "escape").symlink_to(outside, target_is_directory=True)
    return store


def test_links_out_of_a_local_store_are_never_followed(linked, tmp_path):
    for key in ("r/evil.png", "r/dir/passwd", "escape/passwd"):
        with pytest.raises(LinkOutsideStoreError, match="link out of the store root"):
            linked.get_bytes(key)
        with pytest.raises(MissingKeyError):  # to readers, the key is not there
            linked.get_file(key, tmp_path / "copy")
        assert not linked.exists(key)
    assert not (tmp_path / "copy").exists()
    assert linked.get_bytes("r/alias.png") == b"png"  # a link that stays inside is fine
    assert linked.list_keys() == ["r/alias.png", "r/real.png"]
    assert linked.list_keys("escape/") == [] and linked.list_dirs("") == ["r"]
    assert linked.list_dirs("r/") == []

    for key in ("escape/planted.txt", "escape/new/planted.txt"):  # never written through
        with pytest.raises(StoreError, match="link out of the store root"):
            linked.put_bytes(key, b"x")
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["passwd"]
    with pytest.raises(StoreError, match="leads out of the store root"):
        linked.delete_prefix("escape/")
    linked.delete_prefix("r/e")  # removes the link itself, not what it points to
    assert (tmp_path / "outside" / "passwd").read_bytes() == SECRET
    assert not (tmp_path / "store" / "r" / "evil.png").is_symlink()


def test_the_stores_arrow_filesystem_keeps_the_rule(linked):
    fs, base = linked.arrow_filesystem()
    paths = [f"{base}/r/evil.png", f"{base}/r/dir/passwd", f"{base}/r/real.png"]
    [evil, dir_file, real] = fs.get_file_info(paths)
    assert evil.type == dir_file.type == pafs.FileType.NotFound and real.type == pafs.FileType.File
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{base}/r/evil.png")
    with pytest.raises(FileNotFoundError):
        fs.open_input_file(f"{base}/escape/passwd")
    with pytest.raises(FileNotFoundError):
        fs.open_output_stream(f"{base}/escape/planted")
    listed = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    assert sorted(i.path.removeprefix(f"{base}/") for i in listed if i.type == pafs.FileType.File) == [
        "r/alias.png", "r/real.png"
    ]
    assert fs.open_input_stream(f"{base}/r/alias.png").read() == b"png"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_local_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    store = LocalStore(tmp_path / "store")
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    old = os.umask(umask)
    try:
        store.put_bytes("a/b.json", b"{}")
        store.put_file("a/c.pt", src)
        (tmp_path / "plain").write_bytes(b"")  # what any other program would get
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for key in ("a/b.json", "a/c.pt"):
        assert stat.S_IMODE((tmp_path / "store" / key).stat().st_mode) == expected, key
    assert store.list_keys() == ["a/b.json", "a/c.pt"]  # no temp file left behind


def test_the_read_only_check_creates_nothing_and_needs_no_write_access(tmp_path):
    missing = LocalStore(tmp_path / "typo")
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        missing.check_readable()
    assert not (tmp_path / "typo").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        LocalStore(blocker).check_readable()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        LocalStore(read_only).check_readable()
    finally:
        read_only.chmod(0o755)
    missing.check()  # the writers' check still creates the folder
    assert (tmp_path / "typo").is_dir()


# --- S3 endpoints and credentials -------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def credentials(monkeypatch) -> None:
    """Credentials as a cluster would have them (the session's endpoint allow-list is kept)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETSECRET")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-strangers")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_credentials_never_go_to_an_endpoint_that_is_not_allowed(credentials, listener: Listener):
    store = open_store("s3://bucket/atlases", listener.url)
    calls = [store.check, lambda: store.put_bytes("k", b"v"), lambda: store.get_bytes("k"),
             lambda: store.list_keys(""), lambda: store.exists("k"), store.arrow_filesystem]
    for call in calls:
        with pytest.raises(EndpointNotAllowedError) as caught:
            call()
        assert listener.url in str(caught.value) and ENDPOINTS_ENV in str(caught.value)

    # A job whose spec names the endpoint fails the same way, before anything is sent.
    spec = parse_spec({
        "kind": "atlas", "name": "stray", "dataset": {"format": "procedural", "num_images": 20},
        "layers": ["conv1"], "output": "s3://bucket/atlases", "endpoint_url": listener.url,
    })
    with pytest.raises(EndpointNotAllowedError):
        run_spec(spec, quiet=True)
    assert listener.connections == 0 and listener.received == b""


def test_an_allowed_endpoint_does_get_the_request(credentials, listener: Listener, monkeypatch):
    """The allow-list is what held the request back: listed (in any spelling), it goes out."""
    spelled = listener.url.replace("http://", "HTTP://") + "/"
    monkeypatch.setenv(ENDPOINTS_ENV, f"https://s3.example.org, {spelled}")
    assert endpoint_allowed(listener.url) and endpoint_allowed(None)
    store = open_store("s3://bucket/atlases", listener.url, max_attempts=1)
    with pytest.raises(StoreError):
        store.put_bytes("k", b"v")  # the listener is no S3 server: it hangs up
    assert listener.connections >= 1 and b"PUT /bucket/atlases/k" in listener.received


def test_endpoints_named_by_the_operator_or_the_environment_are_allowed(monkeypatch):
    monkeypatch.delenv(ENDPOINTS_ENV, raising=False)
    assert not endpoint_allowed("http://minio.internal:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    assert endpoint_allowed("http://MINIO.internal:9000/")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert not endpoint_allowed("http://ceph.internal")
    trust_endpoint("http://ceph.internal:80")  # e.g. `zfatlas serve --endpoint-url http://ceph.internal`
    assert endpoint_allowed("http://ceph.internal") and not endpoint_allowed("https://ceph.internal")

