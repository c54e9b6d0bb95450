"""``[user@]host[:port]`` addresses (IPv6 in brackets) and worker files of them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from fleetctl.errors import ConfigError

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class Address:
    host: str
    port: int | None = None
    user: str | None = None

    def __str__(self) -> str:
        return format_address(self.host, self.port, self.user)


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def format_address(host: str, port: int | None = None, user: str | None = None) -> str:
    """``user@host:port`` with IPv6 literals bracketed, the way users type them."""
    shown = f"[{host}]" if _is_ipv6(host) and port is not None else host
    if port is not None:
        shown = f"{shown}:{port}"
    return f"{user}@{shown}" if user else shown


def _parse_port(text: str, original: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(f"invalid port {text!r} in {original!r}", hint="use a number from 1 to 65535")
    return int(text)


def parse_address(text: str, *, require_user: bool = False) -> Address:
    """Parse ``[user@]host[:port]``; IPv6 as ``[2001:db8::1]:2222`` or bare ``2001:db8::1``."""
    original = text
    text = text.strip()
    user: str | None = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
        if not user:
            raise ConfigError(f"empty user in address {original!r}", hint="write USER@HOST[:PORT]")
    elif require_user:
        raise ConfigError(f"address {original!r} has no user", hint="write USER@HOST[:PORT]")
    port: int | None = None
    if text.startswith("["):
        close = text.find("]")
        if close == -1:
            raise ConfigError(f"unclosed '[' in address {original!r}", hint="write [IPV6]:PORT")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"unexpected {rest!r} after ']' in address {original!r}")
            port = _parse_port(rest[1:], original)
        if not _is_ipv6(host):
            raise ConfigError(f"{host!r} in brackets is not an IPv6 address ({original!r})")
    elif text.count(":") > 1:
        host = text  # a bare IPv6 literal cannot carry a port
        if not _is_ipv6(host):
            raise ConfigError(f"cannot parse address {original!r}", hint="put IPv6 literals in brackets: [2001:db8::1]:22")
    elif ":" in text:
        host, port_text = text.split(":", 1)
        port = _parse_port(port_text, original)
    else:
        host = text
    if not host:
        raise ConfigError(f"empty host in address {original!r}", hint="write USER@HOST[:PORT]")
    if not _is_ipv6(host) and not _HOSTNAME.match(host):
        raise ConfigError(f"invalid host name {host!r} in address {original!r}")
    return Address(host=host, port=port, user=user)


@dataclass(frozen=True)
class WorkerLine:
    line_number: int
    address: Address


def parse_worker_file(text: str, source: str = "<worker file>") -> list[WorkerLine]:
    """One host per line, ``#`` comments; a host listed twice is an error naming both lines."""
    seen: dict[tuple[str, int | None], int] = {}
    workers: list[WorkerLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            address = parse_address(line)
        except ConfigError as exc:
            raise ConfigError(f"{source}:{number}: {exc.message}", hint=exc.hint) from None
        key = (address.host.lower(), address.port or 22)
        if key in seen:
            raise ConfigError(
                f"{source}:{number}: {format_address(address.host, address.port)} "
                f"is already listed on line {seen[key]}",
                hint="remove one of the two lines",
            )
        seen[key] = number
        workers.append(WorkerLine(number, address))
    return workers


def read_worker_file(path: Path) -> list[WorkerLine]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read worker file {path}: {exc.strerror}") from None
    return parse_worker_file(text, str(path))
