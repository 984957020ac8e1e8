"""Workspace secrets into a container, never on a command line, in podman's environment or on disk.

``podman run --env-file PATH`` reads PATH once, before it creates the container. PATH is a FIFO
(mode 0600, in a folder of its own, 0700) that the platform writes the variables into as podman reads
them; it is removed as soon as podman has read it, or podman ended without reading it. Not ``-e NAME``
with the value in podman's own environment, as the runtime's variables go: a secret's key (say
``LD_PRELOAD`` or ``CONTAINERS_CONF``) would then be podman's setting too.

podman's env-file is one ``KEY=VALUE`` a line, taken as is (no quoting), so a value with a line break
cannot be passed this way: such a secret fails the container's start, saying which key.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Mapping

from opbox.errors import ConfigError


class SecretEnvFile:
    def __init__(self, values: Mapping[str, str]):
        for key, value in values.items():
            if any(c in value for c in "\n\r\0"):
                raise ConfigError(f"the secret variable {key} holds a line break, which podman's --env-file cannot "
                                  "pass to a container: store it encoded (base64) on the container backend")
        self.data = "".join(f"{key}={value}\n" for key, value in values.items()).encode()
        self.folder = tempfile.mkdtemp(prefix="opbox-env-")  # 0700
        self.path = os.path.join(self.folder, "env")
        os.mkfifo(self.path, 0o600)

    def args(self) -> list[str]:
        return ["--env-file", self.path]

    async def feed(self, proc: asyncio.subprocess.Process) -> None:
        """Write the variables as podman reads them; then remove the FIFO. If podman ends first (it failed
        before reading), open the FIFO for reading here, so the writer is let go, and drain it."""
        writer = asyncio.ensure_future(asyncio.to_thread(self._write))
        ended = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({writer, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not writer.done():
                await self._release(writer)
        finally:
            ended.cancel()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # blocks until a reader opens it
        try:
            view = memoryview(self.data)
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:  # the reader left early
            pass
        finally:
            os.close(fd)

    async def _release(self, writer: asyncio.Future) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the writer's open returns
        try:
            while not writer.done():
                try:
                    os.read(fd, 65536)  # drained here, so a write larger than the pipe's buffer ends too
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.01)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """The container was never started: nothing will read the FIFO."""
        shutil.rmtree(self.folder, ignore_errors=True)
