"""The parsers against case files: our own fixtures (tests/fixtures/gpu, always) and other
projects' fixtures (../shared/gpu-outputs/peers, when present). Each case names its command and
the values (or the typed error) its output must give."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fleetctl import errors
from fleetctl.telemetry import parsers
from fleetctl.telemetry.parsers import parse_gpu_output
from tests.shared import FIXTURES, PEERS, require_shared

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it

TOLERANCE = 0.01


def _cases(folder: Path) -> list[dict[str, Any]]:
    path = folder / "cases.json"
    return list(json.loads(path.read_text())["cases"]) if path.exists() else []


def _check(case: dict[str, Any], folder: Path) -> None:
    raw = (folder / case["file"]).read_bytes()
    if case.get("sha256"):  # the values below were written for these bytes
        assert hashlib.sha256(raw).hexdigest() == case["sha256"], f"{case['file']} changed since cases.json was written"
    text = raw.decode("utf-8")
    stderr = (folder / case["stderr_file"]).read_text() if case.get("stderr_file") else ""
    if case.get("error"):
        error = getattr(parsers, case["error"], None) or getattr(errors, case["error"])
        with pytest.raises(error, match=re.escape(case["match"]) if "match" in case else None) as caught:
            parse_gpu_output(case["command"], text, exit_code=case.get("exit_code", 0), stderr=stderr)
        assert type(caught.value) is error and "\n" not in str(caught.value), case["file"]
        return
    samples = parse_gpu_output(case["command"], text, exit_code=case.get("exit_code", 0), stderr=stderr)
    expected = case["expected"]
    assert len(samples) == expected["count"], case["file"]
    if case.get("check") == "count-only":
        return
    for sample, values in zip(samples, expected.get("gpus", []), strict=False):
        for key, want in values.items():
            got = getattr(sample, key)
            where = f"{case['file']} GPU {sample.index} {key}"
            if isinstance(want, dict) and "any_of" in want:
                assert got is not None and any(abs(got - w) <= TOLERANCE for w in want["any_of"]), where
            elif isinstance(want, (int, float)) and not isinstance(want, bool):
                assert got is not None and abs(got - want) <= TOLERANCE, f"{where}: {got} != {want}"
            else:
                assert got == want, f"{where}: {got!r} != {want!r}"


OWN = _cases(FIXTURES)


@pytest.mark.parametrize("case", OWN, ids=[c["file"] for c in OWN])
def test_own_fixture(case: dict[str, Any]) -> None:
    _check(case, FIXTURES)


def test_own_fixtures_cover_every_format_and_failure() -> None:
    files = {p.name for p in FIXTURES.iterdir() if p.is_file() and p.name != "cases.json" and p.suffix != ".stderr"}  # health/ has its own README
    assert files == {c["file"] for c in OWN}
    commands = " ".join(c["command"] for c in OWN)
    for needed in ("noheader,nounits", "--format=csv ", "nvidia-smi.exe", "rocm-smi --json", "--csv", "amd-smi"):
        assert needed in commands + " ", needed
    assert {c["error"] for c in OWN if "error" in c} == {"DriverError", "NoGpusError", "InvalidQueryError", "ToolMissingError",
                                                         "ParseError"}


PEER_CASES = _cases(PEERS)


@pytest.mark.parametrize("case", PEER_CASES or [None], ids=[c["file"] for c in PEER_CASES] or ["peers-absent"])
def test_peer_fixture(case: dict[str, Any] | None) -> None:
    folder = require_shared(PEERS)
    assert case is not None, f"{folder}/cases.json lists no cases"
    _check(case, folder)
