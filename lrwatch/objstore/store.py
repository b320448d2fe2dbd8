"""The one door to object storage: an fsspec filesystem rooted at a run or log directory URL.

This is the only module that imports fsspec, and it does so when a :class:`Store` is built (on
the hook's upload thread, or in ``lrwatch serve``), never when lrwatch is imported.

Credentials and the endpoint come from where the storage library looks for them: for S3,
botocore's chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance
roles) and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server
(MinIO, Ceph, moto); for any protocol, fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``,
``FSSPEC_GCS='{"project": ...}'`` or a file in ``~/.config/fsspec``). Both processes of a run
(trainer and daemon) read the same variables, so nothing is passed on a command line.
"""

from __future__ import annotations

from typing import Any

from lrwatch.errors import ConfigError

# Short timeouts and few retries for S3: an upload that cannot get through is retried by the
# uploader later anyway, and a closing trainer should not wait minutes for a dead endpoint.
_S3_OPTIONS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 20,
        "retries": {"max_attempts": 3, "mode": "standard"},
    }
}


class Store:
    """Objects under one URL, named by their key relative to it (``run1/events...``).

    Args:
        url: ``s3://bucket/prefix`` or any URL fsspec knows (``gs://``, ``az://``, ``memory://``).

    Example::

        store = Store("s3://bucket/runs")
        store.put("run1/lrwatch_control.json", data)
        store.listing()          # {"run1/lrwatch_control.json": (size, etag), ...}
        store.get("run1/lrwatch_control.json", start=10)
    """

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError as err:  # pragma: no cover - the [s3] extra brings it
            raise ConfigError(
                f"{url}: object storage needs fsspec: pip install 'lrwatch[s3]'"
            ) from err
        protocol = url.split("://", 1)[0].lower()
        # No instance cache (each thread its own client) and no listing cache (a stale listing
        # would hide new segments).
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if protocol in ("s3", "s3a"):
            options.update(_S3_OPTIONS)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as err:
            raise ConfigError(
                f"{url}: no fsspec backend for {protocol}:// ({err}); for s3:// pip install "
                "'lrwatch[s3]', for gs:// pip install gcsfs"
            ) from err
        self.url = url.rstrip("/")
        self.root = root.rstrip("/")

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def put(self, key: str, data: bytes) -> None:
        """Write one object whole: readers see the old object or the new one, never a mix."""
        self.fs.pipe_file(self.path(key), data)

    def get(self, key: str, *, start: int = 0, limit: int | None = None) -> bytes | None:
        """Bytes of an object from ``start`` (at most ``limit``); None if it does not exist."""
        end = None if limit is None else start + limit
        try:
            data: bytes = self.fs.cat_file(self.path(key), start=start or None, end=end)
        except FileNotFoundError:
            return None
        return data

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self.path(key))
        except FileNotFoundError:
            pass

    def listing(self) -> dict[str, tuple[int, str]]:
        """Every object under the URL: key -> (size, a tag that changes when it is rewritten).

        One recursive listing (one request per 1,000 objects on S3). A bucket or prefix that
        does not exist yet lists as empty.
        """
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        prefix = self.root + "/"
        out = {}
        for name, info in found.items():
            if info.get("type") == "directory" or not name.startswith(prefix):
                continue
            tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
            out[name[len(prefix) :]] = (int(info.get("size") or 0), f"{tag}{info.get('mtime', '')}")
        return out
