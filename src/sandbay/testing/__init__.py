"""Test helpers for sandbay and its providers.

`ScriptedModel` is a local fake of the Anthropic Messages API that answers from a script, so
the real ``claude`` CLI runs whole agent turns offline and deterministically.
"""

from ._model import (
    RecordedRequest,
    ScriptedModel,
    Turn,
    TurnLike,
    default_script,
    is_side_request,
    serve,
)

__all__ = [
    "RecordedRequest",
    "ScriptedModel",
    "Turn",
    "TurnLike",
    "default_script",
    "is_side_request",
    "serve",
]
