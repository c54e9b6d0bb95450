"""Agent label selectors: ``{"gpu_type": "a100*"}`` matches agents whose labels fit every glob.
Pure; shared by job placement and ad-hoc fan-out."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping


def labels_match(patterns: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Every key in ``patterns`` is a label and its value matches the glob (case-sensitive)."""
    return all(key in labels and fnmatch.fnmatchcase(labels[key], pattern) for key, pattern in patterns.items())
