from __future__ import annotations

import pytest

from fleetctl.errors import ConfigError
from fleetctl.ssh.addresses import Address, format_address, parse_address, parse_worker_file

pytestmark = pytest.mark.no_store  # never opens a store: the PostgreSQL pass deselects it


@pytest.mark.parametrize(("text", "expected"), [
    ("root@10.0.0.1", Address("10.0.0.1", None, "root")),
    ("root@10.0.0.1:2222", Address("10.0.0.1", 2222, "root")),
    ("gpu.example.com", Address("gpu.example.com")),
    ("root@[2001:db8::1]:2222", Address("2001:db8::1", 2222, "root")),
    ("[2001:db8::1]", Address("2001:db8::1")),
    ("ubuntu@2001:db8::1", Address("2001:db8::1", None, "ubuntu")),
])
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["root@", "@host", "host:0", "host:99999", "host:abc", "[10.0.0.1]:22",
                                  "[2001:db8::1", "bad host"])
def test_bad_addresses_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_format_brackets_ipv6_with_port() -> None:
    assert format_address("2001:db8::1", 22, "root") == "root@[2001:db8::1]:22"


def test_worker_file_comments_ipv6_and_duplicates() -> None:
    workers = parse_worker_file("# fleet\nroot@a.example\n\nb.example:2222  # second\n[2001:db8::2]:22\n")
    assert [str(w.address) for w in workers] == ["root@a.example", "b.example:2222", "[2001:db8::2]:22"]
    assert [w.line_number for w in workers] == [2, 4, 5]
    with pytest.raises(ConfigError, match=r"workers:3: a.example:22 is already listed on line 1"):
        parse_worker_file("a.example\nb.example\nroot@a.example:22\n", "workers")
