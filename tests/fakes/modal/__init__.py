"""A local Modal control plane and task command router (see `_server`)."""

from ._server import CONTAINER_LABEL, FakeModal, Faults, docker_available

__all__ = ["CONTAINER_LABEL", "FakeModal", "Faults", "docker_available"]
