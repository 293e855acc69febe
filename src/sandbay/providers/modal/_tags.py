"""Labels as Modal tags, and back.

Modal documents tags as letters, digits, ``.``, ``_`` and ``-``, at most 63 characters (its
SDK checks an app's tags so; a sandbox's go to the server unchecked, which is assumed to hold
them to the same rule). Label names must already fit; a value that does not (``host:pid``,
a path) is stored as ``b64.`` and its URL-safe base64, and read back as it was. The spec
`connect` needs (workdir, user, network) is kept in tags of its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping

from ..._errors import ConfigError
from ..._provider import OWNER
from ._errors import NAME

_TAG = re.compile(r"^[a-zA-Z0-9._-]{1,63}$")
_ENCODED = "b64."

WORKDIR = "sandbay.workdir"
USER = "sandbay.user"
NETWORK = "sandbay.network"
#: Tags that hold the spec rather than labels.
SPEC_TAGS = frozenset({WORKDIR, USER, NETWORK})


def encode_value(value: str) -> str | None:
    """The tag value that stores ``value``, or ``None`` if it cannot fit in 63 characters."""
    if _TAG.match(value) and not value.startswith(_ENCODED):
        return value
    encoded = _ENCODED + base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")
    return encoded if len(encoded) <= 63 else None


def decode_value(value: str) -> str:
    """The label value a tag value stores."""
    if not value.startswith(_ENCODED):
        return value
    data = value[len(_ENCODED) :]
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return value  # not ours: keep it as it is


def labels_to_tags(labels: Mapping[str, str]) -> dict[str, str]:
    """Labels as Modal tags.

    Raises:
        ConfigError: A label's name is not a valid tag name, or its value is too long.
    """
    tags = {}
    for key, value in labels.items():
        if not _TAG.match(key):
            raise ConfigError(
                f"label {key!r} cannot be a Modal tag: names are letters, digits, '.', '_' and "
                "'-', at most 63 characters",
                provider=NAME,
            )
        encoded = encode_value(value)
        if encoded is None and key == OWNER:  # informational: shorten the host part
            host, _, pid = value.rpartition(":")
            while encoded is None and host:
                host = host[:-1]
                encoded = encode_value(f"{host}:{pid}")
        if encoded is None:
            raise ConfigError(
                f"label {key}={value!r} is too long for a Modal tag (63 characters, or about "
                "44 bytes for a value with other characters than letters, digits, '.', '_', "
                "'-')",
                provider=NAME,
            )
        tags[key] = encoded
    return tags


def tags_to_labels(tags: Mapping[str, str]) -> dict[str, str]:
    """Modal tags as labels, the spec's own tags left out."""
    return {key: decode_value(value) for key, value in tags.items() if key not in SPEC_TAGS}
