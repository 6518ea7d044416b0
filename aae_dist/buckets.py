"""An S3 filesystem that never creates a bucket: s3fs creates a missing one in mkdir/makedirs, so a
mistyped --storage would silently become a new bucket.  Imported only for s3:// URLs (s3fs is an extra)."""

from __future__ import annotations

from fsspec.asyn import sync
from s3fs import S3FileSystem

from .errors import UserError

_WRITES = frozenset({"create_bucket", "put_object", "create_multipart_upload", "copy_object"})
_FOUND: set[tuple[str, str]] = set()  # (endpoint, bucket) seen to exist: one probe per bucket per process


class ExistingBucketsOnly(S3FileSystem):
    """Every write request first checks that its bucket exists; create_bucket itself is never sent."""

    async def _call_s3(self, method, *args, **kwargs):
        bucket = kwargs.get("Bucket")
        if method in _WRITES and bucket:
            await self._require_bucket(bucket)
            if method == "create_bucket":  # s3fs's mkdir on a bucket it could not see: it exists after all
                return {}
        return await super()._call_s3(method, *args, **kwargs)

    def require_bucket(self, bucket: str) -> None:
        sync(self.loop, self._require_bucket, bucket)

    async def _require_bucket(self, bucket: str) -> None:
        """head_bucket, once: missing is a UserError naming the bucket; no rights to look (403) is left to the write itself;
        connection errors propagate, so storage.with_retries rides out an outage as before."""
        await self.set_session()
        endpoint = str(self.s3.meta.endpoint_url)
        if (endpoint, bucket) in _FOUND:
            return
        try:
            await super()._call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            from .storage import redact

            raise UserError(f"bucket '{bucket}' does not exist at {redact(endpoint)}: create it first "
                                f"(e.g. aws s3 mb s3://{bucket}) or fix the URL; aae-dist never creates buckets") from None
        except PermissionError:
            pass
        _FOUND.add((endpoint, bucket))


# One instance cache with S3FileSystem: S3FileSystem.clear_instance_cache() (after the endpoint changed) clears ours too.
ExistingBucketsOnly._cache = S3FileSystem._cache
