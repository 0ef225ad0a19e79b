"""File storage: content-addressed blobs (images, masks, checkpoints), never in the database."""

from backend.storage.blobs import (
    BlobStore,
    LocalBlobStore,
    StagedWrites,
    StoredBlob,
    sha256_bytes,
    sha256_file,
    staged_writes,
)

__all__ = ["BlobStore", "LocalBlobStore", "StagedWrites", "StoredBlob", "sha256_bytes", "sha256_file", "staged_writes"]
