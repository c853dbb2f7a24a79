"""A local Cloud Storage for the tests: `python tests/gcs_emulator.py PORT BUCKET` serves the
JSON API on 127.0.0.1:PORT (gcp-storage-emulator, in memory) with BUCKET created.

gcp-storage-emulator does not send the `x-goog-generation` header with an object's bytes, which
Cloud Storage does and tensorstore's gcs driver reads (without it a read of an existing object
fails with "Malformed StorageGeneration"); this script adds that header to its downloads. The
emulator also ignores `ifGenerationMatch` preconditions (tensorstore's guard against concurrent
writers): the tests have one writer per object, so nothing depends on them.
"""

from __future__ import annotations

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    """The emulator's download, with the object's generation headers as Cloud Storage sends them."""
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not found: the emulator's own 404 stands
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def main(port: int, bucket: str) -> None:
    objects.download = download  # objects.get calls it for ?alt=media
    for _, handlers in server.HANDLERS:  # the routes that name it directly
        for method, handler in list(handlers.items()):
            if handler is _download:
                handlers[method] = download
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
