"""Docker provider: each sandbox is a container on a Docker engine, driven by the ``docker`` SDK.

A container's main process (under Docker's init) holds its lease: it exits once the expiry in
a root-owned file (`LEASE_FILE`, rewritten by `Sandbox.extend`) has passed, so a container
stops by itself one lease after its owner last renewed it, even if nobody removes it
(``sandbay gc`` then removes it). Processes are
``docker exec`` sessions whose hijacked socket carries stdin one way and multiplexed
stdout/stderr frames the other; the frames are demultiplexed here, on demand, by whichever
stream is being read. Files move through the archive endpoints as in-memory tar streams.

Every blocking SDK call runs in a worker thread. Every exception of the SDK (and of
``requests`` beneath it) is turned into sandbay's error tree by `map_docker_error`.

The code is split by concern: `_errors` (error mapping and the client), `_provider`
(`DockerProvider`), `_sandbox` (`DockerSandbox`), `_process` (an exec session and its
frame demultiplexing) and `_image` (the agent image recipe rendered as a Dockerfile and
built). Only this package imports the ``docker`` SDK.
"""

from __future__ import annotations

from ._errors import docker_client, docker_errors, map_docker_error
from ._provider import DockerProvider
from ._sandbox import DockerSandbox

__all__ = ["DockerProvider", "DockerSandbox", "docker_client", "docker_errors", "map_docker_error"]
