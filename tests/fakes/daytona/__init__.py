"""A fake Daytona control plane: the REST API and the toolbox, on 127.0.0.1."""

from .server import FakeDaytona, Faults

__all__ = ["FakeDaytona", "Faults"]
