"""``OrganiseError``: bad input to ``flystage organise``, raised by the folder walk, the label
rules and the group split alike (on its own so that those modules need not import organise)."""

from __future__ import annotations

from flystage.manifest import ManifestError


class OrganiseError(ManifestError):
    """Bad input to organise (folders, labels CSV, label, group and split options); the message
    says what to do. A ``ManifestError``: catching that catches both."""
