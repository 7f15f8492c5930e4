"""Object storage: one interface, a local-folder backend and an S3 backend.

Keys are POSIX-style relative paths (``raw/ab/ab12...``, ``listings/demo/crawl.jsonl``).
Images are content-addressed: :meth:`Storage.put_image` stores bytes once under their
sha256 and returns that hash, the ``image_id`` used everywhere else in carflow.

Nothing happens at import time and constructing a backend opens no connection: the
boto3 client is created lazily on first use (and per process, so a backend object can
be pickled into a Dask/process worker).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

if TYPE_CHECKING:  # pragma: no cover
    from carflow.settings import StorageSettings

from carflow.keys import IMAGE_PREFIX, image_key  # noqa: F401 - re-exported: keys have one home


class StorageError(Exception):
    """A storage operation failed for a reason other than a missing key."""


class StorageKeyError(KeyError, StorageError):
    """The key does not exist in the storage."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean_key(key: str) -> str:
    key = key.replace("\\", "/").lstrip("/")
    parts = key.split("/")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


class Storage(ABC):
    """put/get/exists/list/delete over keys, plus content-addressed images."""

    #: ``local`` or ``s3``
    backend: str

    @abstractmethod
    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key that starts with ``prefix`` (sorted)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """A URI a person can paste (``file:///…`` or ``s3://bucket/…``)."""

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        """Store the rest of the open binary file ``fileobj`` under ``key`` (a large
        object written to a temporary file first, e.g. a manifest: its bytes are never all
        in memory where the backend can stream them)."""
        self.put(key, fileobj.read(), content_type=content_type)

    def get_file(self, key: str, fileobj: BinaryIO) -> None:
        """Write the object under ``key`` into the open binary file ``fileobj`` (streamed
        where the backend can: a large manifest read into a local file, never whole into
        memory). A missing key raises :class:`StorageKeyError`."""
        fileobj.write(self.get(key))

    # -- content-addressed images -------------------------------------------------
    def put_image(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (once) and return the sha256 hex."""
        image_id = sha256_hex(data)
        key = image_key(image_id)
        if not self.exists(key):
            self.put(key, data)
        return image_id

    def get_image(self, image_id: str) -> bytes:
        return self.get(image_key(image_id))

    def has_image(self, image_id: str) -> bool:
        return self.exists(image_key(image_id))

    def put_text(self, key: str, text: str) -> None:
        self.put(key, text.encode("utf-8"), content_type="text/plain; charset=utf-8")

    def get_text(self, key: str) -> str:
        return self.get(key).decode("utf-8")


class LocalStorage(Storage):
    """A folder. Writes are atomic: a temp file in the same folder, then ``os.replace``."""

    backend = "local"

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / _clean_key(key)

    def _write(self, key: str, write: Callable[[BinaryIO], Any]) -> None:
        """``write(fh)`` into a temp file beside the key's path, then ``os.replace``."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        self._write(key, lambda fh: shutil.copyfileobj(fileobj, fh, 1 << 20))

    def get_file(self, key: str, fileobj: BinaryIO) -> None:
        try:
            with open(self._path(key), "rb") as fh:
                shutil.copyfileobj(fh, fileobj, 1 << 20)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageKeyError(key) from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StorageKeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.exists():
            return
        prefix = prefix.lstrip("/")
        # walk only the deepest directory that the prefix names
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base_dir if base_dir else self.root
        if not start.is_dir():
            return
        keys = []
        for dirpath, _dirnames, filenames in os.walk(start):
            for name in filenames:
                if name.startswith(".tmp-"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    keys.append(rel)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def uri(self, key: str = "") -> str:
        return (self.root / key).as_uri() if key else self.root.as_uri()


class S3Storage(Storage):
    """An S3 bucket (AWS, MinIO, moto) through boto3.

    ``endpoint_url`` points at MinIO/moto; retries use botocore's ``adaptive`` mode
    (``storage.max_attempts`` tries with exponential backoff and jitter), each try bounded
    by ``storage.connect_timeout_s`` / ``storage.read_timeout_s``.
    Credentials come from the standard AWS environment/credential chain only.
    """

    backend = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 10,
        create_bucket: bool = False,
        max_pool_connections: int = 32,
        credentials: tuple[Any, Any] | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ):
        if not bucket:
            raise ValueError("S3 storage needs a bucket (setting: storage.bucket / CARFLOW_STORAGE__BUCKET)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.max_pool_connections = max_pool_connections
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._create_bucket = create_bucket
        # (access_key_id, secret_access_key) as pydantic SecretStr: never shown by repr/logs
        self._credentials = credentials
        self._local = threading.local()
        self._pid = None

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local", None)
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def client(self):
        """A boto3 S3 client, one per thread (boto3 sessions are not thread-safe)."""
        client = getattr(self._local, "client", None)
        if client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            cfg = Config(
                # total_max_attempts counts the first try (botocore's "max_attempts" counts retries)
                retries={"total_max_attempts": self.max_attempts, "mode": "adaptive"},
                max_pool_connections=self.max_pool_connections,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                s3={"addressing_style": "path"} if self.endpoint_url else None,
            )
            creds = {}
            if self._credentials and self._credentials[0] is not None:
                key_id, secret = self._credentials
                creds = {
                    "aws_access_key_id": key_id.get_secret_value(),
                    "aws_secret_access_key": secret.get_secret_value() if secret is not None else None,
                }
            session = boto3.session.Session(**creds)
            client = session.client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1", config=cfg
            )
            self._local.client = client
            self._pid = os.getpid()
            if self._create_bucket:
                self.ensure_bucket(client)
        return client

    def ensure_bucket(self, client=None) -> None:
        client = client or self.client
        from botocore.exceptions import ClientError

        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError:
            client.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)

    def put_file(self, key: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        # one PUT, as put() (botocore streams a seekable body and rewinds it on a retry)
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=fileobj, **extra)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise StorageKeyError(key) from None
            raise StorageError(f"S3 get {self.uri(key)} failed: {exc}") from exc

    def get_file(self, key: str, fileobj: BinaryIO) -> None:
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for chunk in body.iter_chunks(1 << 20):
                fileobj.write(chunk)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                raise StorageKeyError(key) from None
            raise StorageError(f"S3 get {self.uri(key)} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StorageError(f"S3 head {self.uri(key)} failed: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        prefix = prefix.replace("\\", "/").lstrip("/")
        if ".." in prefix.split("/"):
            raise ValueError(f"invalid storage prefix: {prefix!r}")
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                keys.append(self._strip(obj["Key"]))
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str = "") -> str:
        path = self._key(key) if key else self.prefix
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"


def open_storage(spec: StorageSettings | str | os.PathLike[str] | Storage | None = None) -> Storage:
    """Build a storage from settings, a URI (``s3://bucket/prefix``, ``file:///x``, a path)
    or pass an existing one through. ``None`` means the configured default."""
    if isinstance(spec, Storage):
        return spec
    if spec is None:
        from carflow.settings import get_settings

        spec = get_settings().storage
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        parsed = urlparse(text)
        if parsed.scheme == "s3":
            from carflow.settings import get_settings

            st = get_settings().storage
            return S3Storage(
                bucket=parsed.netloc,
                prefix=parsed.path.lstrip("/"),
                endpoint_url=st.endpoint_url,
                region=st.region,
                max_attempts=st.max_attempts,
                credentials=(st.access_key_id, st.secret_access_key),
                connect_timeout=st.connect_timeout_s,
                read_timeout=st.read_timeout_s,
            )
        if parsed.scheme == "file":
            return LocalStorage(parsed.path)
        if parsed.scheme and len(parsed.scheme) > 1:
            raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r} in {text!r} (use a path or s3://)")
        return LocalStorage(text)
    # StorageSettings
    if spec.backend == "local":
        return LocalStorage(spec.root)
    return S3Storage(
        bucket=spec.bucket or "",
        prefix=spec.prefix,
        endpoint_url=spec.endpoint_url,
        region=spec.region,
        max_attempts=spec.max_attempts,
        create_bucket=spec.create_bucket,
        credentials=(spec.access_key_id, spec.secret_access_key),
        connect_timeout=spec.connect_timeout_s,
        read_timeout=spec.read_timeout_s,
    )


def local_file(uri: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A local file for ``uri``: a path or ``file://`` URI is returned as it is; an
    ``s3://`` object is downloaded once into a content-keyed cache
    (``$TMPDIR/carflow-cache/<sha256[:16]>-<name>``, or ``cache_dir``), so a model that
    did not change is not downloaded twice and a changed one never reads a stale copy.
    Raises :class:`FileNotFoundError` (naming the URI) when there is no such file; callers
    that load weights add the setting's name to that message."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(parsed.path if parsed.scheme == "file" else text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{text} does not exist")
        return path
    head, _, name = text.rstrip("/").rpartition("/")
    try:
        data = open_storage(head).get(name)
    except KeyError:
        raise FileNotFoundError(f"{text} does not exist") from None
    except Exception as exc:  # botocore errors: no bucket, no credentials, unreachable endpoint
        raise FileNotFoundError(f"{text} could not be read ({exc.__class__.__name__}: {exc})") from exc
    folder = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "carflow-cache"
    out = folder / f"{hashlib.sha256(data).hexdigest()[:16]}-{name}"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".{os.getpid()}.{threading.get_ident()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, out)
    return out
