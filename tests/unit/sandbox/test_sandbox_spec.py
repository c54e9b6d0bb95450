from __future__ import annotations

import pytest

from fleetctl.errors import SandboxError
from fleetctl.sandbox import HostSpec

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it


@pytest.mark.parametrize(("fields", "message"), [
    ({"mode": "driver_eror"}, "unknown mode 'driver_eror'"),
    ({"vendor": "intel"}, "unknown vendor 'intel'"),
    ({"zone": "dmz"}, "unknown zone 'dmz'"),
])
def test_host_spec_rejects_unknown_values(fields: dict[str, str], message: str) -> None:
    with pytest.raises(SandboxError, match=message):
        HostSpec("h1", **fields)  # type: ignore[arg-type]
