"""Where a host really is and how to log in: ssh_config resolved as OpenSSH resolves it.

The inventory's fields act like ``ssh`` command-line options (``-l -p -i -J -o HostName=``), so
they win; everything else comes from the config files. With an ``ssh`` client installed the answer
is OpenSSH's own (``ssh -G``: Include, Match, tokens, canonicalisation, first match wins); without
one, :mod:`fleetctl.ssh.config_file` reads a documented subset. Either way provenance (which file
and line gave a value) comes from that reader, and ProxyJump hops are resolved again, recursively,
exactly as ssh turns ``ProxyJump a,b`` into ``ssh -J a b -W %h:%p``.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import subprocess
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from fleetctl.errors import ConfigError
from fleetctl.ssh.addresses import format_address
from fleetctl.ssh.config_file import ParsedConfig, expand_hostname, parse_config
from fleetctl.ssh.resolve_cache import AnswerCache, config_digest
from fleetctl.ssh.seam import DEFAULT_IDENTITY_FILES as DEFAULT_IDENTITIES

MAX_JUMP_DEPTH = 8
INVENTORY = "inventory"
DEFAULT = "default"

# Keywords fleetctl cannot honour: when the config sets them (their value differs from OpenSSH's
# default), the agent fails with one line naming the keyword instead of silently connecting
# differently from `ssh`.
UNSUPPORTED = {
    "remotecommand": "fleetctl runs its own commands",
    "proxyusefdpass": "use a ProxyCommand that relays stdin/stdout",
    "sessiontype": "fleetctl needs an exec session",
    "pkcs11provider": "load the token's keys into ssh-agent (`ssh-add -s`) instead",
    "knownhostscommand": "list the keys in a known_hosts file instead",
    "revokedhostkeys": "mark revoked keys with @revoked in known_hosts instead",
    "bindinterface": "use BindAddress instead",
    "pubkeyauthentication": "fleetctl logs in with keys only",
}
_DEFAULTS = {"remotecommand": "none", "proxyusefdpass": "no", "sessiontype": "default", "pkcs11provider": "none",
             "knownhostscommand": "none", "revokedhostkeys": "none", "bindinterface": "none",
             "pubkeyauthentication": "true"}


@dataclass(frozen=True)
class SshOptions:
    """What the inventory says about a hop, as the ``ssh`` command line would say it."""

    user: str | None = None
    port: int | None = None
    identity_files: tuple[str, ...] = ()
    jump: str | None = None  # -J: a comma list, or "none"
    hostname: str | None = None  # -o HostName=...
    origin: str = INVENTORY  # who gave these options, for provenance (the inventory, or a ProxyJump)


@dataclass(frozen=True)
class Resolved:
    """One hop as OpenSSH would dial it. ``sources`` says where each field came from."""

    alias: str  # the name given (OpenSSH's %n)
    hostname: str
    user: str
    port: int
    identity_files: tuple[str, ...] = ()
    certificate_files: tuple[str, ...] = ()
    identities_only: bool = False
    identity_agent: str | None = None  # a socket path, or None for $SSH_AUTH_SOCK; "none" disables
    proxy_jump: tuple[str, ...] = ()
    proxy_command: str | None = None
    strict_host_key_checking: str = "ask"
    user_known_hosts: tuple[str, ...] = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
    global_known_hosts: tuple[str, ...] = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
    host_key_alias: str | None = None
    hash_known_hosts: bool = False
    host_key_algorithms: tuple[str, ...] = ()  # empty: not set by the user
    connect_timeout: float | None = None
    server_alive_interval: int = 0
    address_family: str = "any"
    bind_address: str | None = None
    resolver: str = "ssh -G"
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def address(self) -> str:
        return format_address(self.hostname, self.port, self.user)


def _home_of_passwd() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return str(Path.home())


def _rehome(path: str) -> str:
    """OpenSSH expands ``~`` with the passwd home; fleetctl uses ``$HOME``. They are the same
    directory in real life; where HOME is moved on purpose (tests, containers) fleetctl follows HOME."""
    passwd_home, home = _home_of_passwd(), str(Path.home())
    if passwd_home != home and (path == passwd_home or path.startswith(passwd_home + "/")):
        return home + path[len(passwd_home):]
    return path


def _truthy(value: str) -> bool:
    return value.lower() in ("yes", "true")


class SshConfigResolver:
    """Resolves hosts through ssh_config, once each (results are cached; never per heartbeat)."""

    def __init__(self, config_file: str | os.PathLike[str] | None = None, *, enabled: bool = True,
                 ssh_binary: str | None = None, answers_dir: Path | None = None) -> None:
        self.config_file = Path(os.path.expanduser(str(config_file))) if config_file else None
        self.enabled = enabled
        self.ssh_binary = ssh_binary if ssh_binary is not None else shutil.which("ssh")
        self._cache: dict[tuple[str, SshOptions], Resolved] = {}
        self._lock = threading.Lock()
        # `ssh -G` answers kept between processes (fleetctl.ssh.resolve_cache); None: asked every process.
        self._answers = AnswerCache(answers_dir) if answers_dir is not None else None

    @property
    def mode(self) -> str:
        if not self.enabled:
            return "off (inventory fields and OpenSSH defaults only)"
        if self.ssh_binary:
            return f"exact: {self.ssh_binary} -G"
        return "subset: no ssh client found; fleetctl reads Host, Match (host/originalhost/user/localuser/exec/all), " \
               "Include and tokens itself (install openssh-client for exact resolution)"

    # -- one hop -------------------------------------------------------------------------------
    def resolve(self, host: str, options: SshOptions = SshOptions()) -> Resolved:
        key = (host, options)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        if not self.enabled:
            found = self._without_config(host, options)
        else:
            parsed = self._parse(host, options)
            found = self._from_openssh(host, options, parsed) if self.ssh_binary else \
                self._from_parsed(host, options, parsed)
        with self._lock:
            self._cache[key] = found
        return found

    def _parse(self, host: str, options: SshOptions) -> ParsedConfig | None:
        try:
            return parse_config(host, self.config_file, user=options.user, hostname=options.hostname)
        except ConfigError:
            if not self.ssh_binary:
                raise
            return None  # OpenSSH is the judge; provenance just goes missing

    def _without_config(self, host: str, options: SshOptions) -> Resolved:
        sources = {"hostname": INVENTORY if options.hostname else DEFAULT, "user": INVENTORY if options.user else DEFAULT,
                   "port": INVENTORY if options.port else DEFAULT,
                   "identity_files": INVENTORY if options.identity_files else DEFAULT}
        return Resolved(alias=host, hostname=(options.hostname or host).lower(), user=options.user or getpass.getuser(),
                        port=options.port or 22, identity_files=options.identity_files or DEFAULT_IDENTITIES,
                        proxy_jump=_jumps(options.jump), resolver="off", sources=sources)

    def _command(self, host: str, options: SshOptions) -> list[str]:
        assert self.ssh_binary is not None
        command = [self.ssh_binary, "-G"]
        if self.config_file is not None:
            command += ["-F", str(self.config_file)]
        if options.user:
            command += ["-l", options.user]
        if options.port:
            command += ["-p", str(options.port)]
        for identity in options.identity_files:
            command += ["-i", identity]
        if options.jump:
            command += ["-J", options.jump]
        if options.hostname:
            command += ["-o", f"HostName={options.hostname}"]
        return [*command, "--", host]

    def _ask_openssh(self, command: list[str], host: str, config_file: Path | None) -> dict[str, list[str]]:
        """``ssh -G``'s answer: from the answers kept on disk when every input is unchanged. The inputs'
        digest is taken at each ask (a few small file reads, against an exec), and again after a fresh
        answer: one whose config changed while ssh read it is not kept."""
        if self._answers is None or self.ssh_binary is None:
            return _run_ssh_g(command, host)
        digest = config_digest(config_file)
        key = AnswerCache.key(digest, self.ssh_binary, command) if digest is not None else None
        kept = self._answers.get(key) if key is not None else None
        if kept is not None:
            return kept
        values = _run_ssh_g(command, host)
        if key is not None and config_digest(config_file) == digest:
            self._answers.put(key, values)
        return values

    def _baseline_algorithms(self) -> str:
        """OpenSSH's own default HostKeyAlgorithms, so a config that does not set it is not mistaken
        for one that does (asked once per binary, with no config)."""
        binary = self.ssh_binary
        if binary is None:
            return ""
        if binary not in _BASELINE:
            values = self._ask_openssh([binary, "-G", "-F", "none", "--", "baseline.invalid"], "baseline.invalid",
                                       Path("none"))
            _BASELINE[binary] = values.get("hostkeyalgorithms", [""])[0]
        return _BASELINE[binary]

    def _from_openssh(self, host: str, options: SshOptions, parsed: ParsedConfig | None) -> Resolved:
        values = self._ask_openssh(self._command(host, options), host, self.config_file)
        _refuse_unsupported(host, values)

        def get(key: str, default: str = "") -> str:
            return values.get(key, [default])[0]
        jump = get("proxyjump", "none")
        proxy = get("proxycommand", "none")
        algorithms = get("hostkeyalgorithms")
        baseline = self._baseline_algorithms()
        resolved = Resolved(
            alias=host, hostname=get("hostname", host), user=get("user", getpass.getuser()),
            port=int(get("port", "22")),
            identity_files=tuple(values.get("identityfile", ())),
            certificate_files=tuple(values.get("certificatefile", ())),
            identities_only=_truthy(get("identitiesonly", "no")),
            identity_agent=_agent(get("identityagent", "")),
            proxy_jump=() if jump == "none" else _jumps(jump),
            proxy_command=None if proxy == "none" or jump != "none" else proxy,
            strict_host_key_checking=get("stricthostkeychecking", "ask"),
            user_known_hosts=tuple(_rehome(p) for p in get("userknownhostsfile").split()),
            global_known_hosts=tuple(get("globalknownhostsfile").split()),
            host_key_alias=values.get("hostkeyalias", [None])[0],
            hash_known_hosts=_truthy(get("hashknownhosts", "no")),
            host_key_algorithms=tuple(algorithms.split(",")) if algorithms and algorithms != baseline else (),
            connect_timeout=None if get("connecttimeout", "none") == "none" else float(get("connecttimeout")),
            server_alive_interval=int(get("serveraliveinterval", "0")),
            address_family=get("addressfamily", "any"),
            bind_address=values.get("bindaddress", [None])[0],
            resolver="ssh -G",
        )
        return replace(resolved, sources=_sources(resolved, options, parsed))

    def _from_parsed(self, host: str, options: SshOptions, parsed: ParsedConfig | None) -> Resolved:
        assert parsed is not None

        def get(key: str, default: str = "") -> str:
            setting = parsed.get(key)
            return setting.value if setting else default
        for keyword, reason in UNSUPPORTED.items():
            setting = parsed.get(keyword)
            if setting and setting.value.lower() != _DEFAULTS[keyword]:
                raise ConfigError(f"{setting.source}: {host}: fleetctl cannot honour {setting.value!r} for "
                                  f"{keyword}", hint=reason)
        # `ssh -i` skips a file that does not exist (with a warning); so does the subset.
        identities = [path for path in options.identity_files if os.path.exists(os.path.expanduser(path))]
        given = parsed.get("identityfile")
        identities += list(given.values) if given else []
        hostname = (options.hostname or "").lower() or expand_hostname(get("hostname", host), host)
        jump = options.jump or get("proxyjump", "none")
        proxy = get("proxycommand", "none")
        strict = get("stricthostkeychecking", "ask").lower()
        resolved = Resolved(
            alias=host, hostname=hostname, user=options.user or get("user", getpass.getuser()),
            port=options.port or int(get("port", "22")),
            identity_files=tuple(identities) or DEFAULT_IDENTITIES,
            certificate_files=parsed.get("certificatefile").values if parsed.get("certificatefile") else (),  # type: ignore[union-attr]
            identities_only=_truthy(get("identitiesonly", "no")),
            identity_agent=_agent(get("identityagent", "")),
            proxy_jump=() if jump.lower() == "none" else _jumps(jump),
            proxy_command=None if proxy.lower() == "none" or jump.lower() != "none" else proxy,
            strict_host_key_checking={"true": "yes", "false": "no"}.get(strict, strict),
            user_known_hosts=tuple(get("userknownhostsfile", "~/.ssh/known_hosts ~/.ssh/known_hosts2").split()),
            global_known_hosts=tuple(get("globalknownhostsfile",
                                         "/etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2").split()),
            host_key_alias=get("hostkeyalias") or None,
            hash_known_hosts=_truthy(get("hashknownhosts", "no")),
            host_key_algorithms=tuple(get("hostkeyalgorithms").split(",")) if get("hostkeyalgorithms") else (),
            connect_timeout=float(get("connecttimeout")) if get("connecttimeout", "none") != "none" else None,
            server_alive_interval=int(get("serveraliveinterval", "0")),
            address_family=get("addressfamily", "any"), bind_address=get("bindaddress") or None,
            resolver="fleetctl subset",
        )
        return replace(resolved, sources=_sources(resolved, options, parsed))

    # -- a whole route -----------------------------------------------------------------------------
    def chain(self, host: str, options: SshOptions = SshOptions()) -> list[Resolved]:
        """The hops to ``host``, nearest the controller first, ``host`` last. Each ProxyJump hop is
        resolved through the config again (its own HostName/User/Port/IdentityFile/ProxyJump)."""
        return self._chain(host, options, depth=0, seen=())

    def _chain(self, host: str, options: SshOptions, depth: int, seen: tuple[str, ...]) -> list[Resolved]:
        target = self.resolve(host, options)
        here = f"{target.user}@{target.hostname}:{target.port}"
        if here in seen:
            raise ConfigError(f"ProxyJump loop: {' -> '.join((*seen, here))}",
                              hint="a host must not jump through itself; check ProxyJump in ssh_config")
        if depth > MAX_JUMP_DEPTH:
            raise ConfigError(f"ProxyJump chain to {host} is longer than {MAX_JUMP_DEPTH} hops",
                              hint="check ProxyJump in ssh_config for a loop")
        if not target.proxy_jump:
            return [target]
        *rest, last = target.proxy_jump
        user, jump_host, port = split_jump(last)
        jump_options = SshOptions(user=user, port=port, jump=",".join(rest) if rest else None,
                                  origin=f"ProxyJump of {host}")
        return [*self._chain(jump_host, jump_options, depth + 1, (*seen, here)), target]


def split_jump(spec: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` -> (user, host, port)."""
    text = spec.removeprefix("ssh://").rstrip("/")
    user = None
    if "@" in text:
        user, text = text.rsplit("@", 1)
    port = None
    if text.startswith("["):
        close = text.find("]")
        host, rest = text[1:close], text[close + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text.isdigit():
            raise ConfigError(f"ProxyJump {spec!r}: port {port_text!r} is not a number")
        port = int(port_text)
    else:
        host = text
    if not host:
        raise ConfigError(f"ProxyJump {spec!r} names no host", hint="write [user@]host[:port]")
    return user or None, host, port


def _jumps(value: str | None) -> tuple[str, ...]:
    if not value or value.lower() == "none":
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _agent(value: str) -> str | None:
    if not value or value == "SSH_AUTH_SOCK":
        return None
    if value.lower() == "none":
        return "none"
    if value.startswith("$"):
        return os.environ.get(value[1:], "none")
    return os.path.expanduser(value)


def _run_ssh_g(command: list[str], host: str) -> dict[str, list[str]]:
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run `{' '.join(command[:2])}` to resolve {host}: {exc}",
                          hint="check the ssh client, or set ssh_config = false") from exc
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip() and "Pseudo-terminal" not in line]
        problem = lines[0] if lines else f"exit {done.returncode}"
        raise ConfigError(f"ssh_config for {host}: {problem}",
                          hint="fix that line; `ssh -G " + host + "` shows what OpenSSH makes of the config")
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key.lower(), []).append(value)
    return values


_BASELINE: dict[str, str] = {}  # per ssh binary: OpenSSH's default HostKeyAlgorithms


def _refuse_unsupported(host: str, values: dict[str, list[str]]) -> None:
    for keyword, reason in UNSUPPORTED.items():
        value = values.get(keyword, [_DEFAULTS[keyword]])[0]
        if value.lower() not in (_DEFAULTS[keyword], "yes" if keyword == "pubkeyauthentication" else ""):
            raise ConfigError(f"ssh_config for {host}: fleetctl cannot honour {keyword} {value!r}", hint=reason)


_FIELD_KEYWORDS = {"hostname": "hostname", "user": "user", "port": "port", "identity_files": "identityfile",
                   "certificate_files": "certificatefile", "identities_only": "identitiesonly",
                   "proxy_jump": "proxyjump", "proxy_command": "proxycommand",
                   "strict_host_key_checking": "stricthostkeychecking", "host_key_alias": "hostkeyalias",
                   "connect_timeout": "connecttimeout", "identity_agent": "identityagent"}


def _sources(resolved: Resolved, options: SshOptions, parsed: ParsedConfig | None) -> dict[str, str]:
    from_inventory = {"hostname": options.hostname, "user": options.user, "port": options.port,
                      "identity_files": options.identity_files or None, "proxy_jump": options.jump}
    sources: dict[str, str] = {}
    for name, keyword in _FIELD_KEYWORDS.items():
        if from_inventory.get(name):
            sources[name] = options.origin
            continue
        setting = parsed.get(keyword) if parsed else None
        if setting is not None:
            sources[name] = ", ".join(dict.fromkeys(setting.sources))
        elif parsed is None and resolved.resolver == "ssh -G":
            sources[name] = "ssh -G"
        elif name == "hostname":
            sources[name] = f"the name given ({options.origin})"
        else:
            sources[name] = DEFAULT
    return sources
