"""ssh_config read the way OpenSSH's readconf.c reads it, for a documented subset.

This is the fallback when no ``ssh`` client is installed (``ssh -G`` is the exact resolver), and
the source of *provenance* in both cases: which file and line gave each value.

Supported: ``Host`` (wildcards, ``!`` negation, case-sensitive as OpenSSH), ``Match`` with
``all``, ``host``, ``originalhost``, ``user``, ``localuser`` and ``exec`` (each negatable),
``Include`` (globs; relative paths under ``~/.ssh``, or ``/etc/ssh`` from the system file; also
inside Host/Match blocks), ``keyword value`` and ``keyword=value``, double quotes, trailing
``#`` comments, keywords in any case, first value wins (IdentityFile and CertificateFile
accumulate), ``%h`` and ``%%`` in HostName. ``Match canonical/final/localnetwork/tagged`` and
``CanonicalizeHostname yes`` need the real client and are refused by name.
"""

from __future__ import annotations

import functools
import getpass
import glob
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fleetctl.errors import ConfigError

MAX_INCLUDE_DEPTH = 16
SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")
MULTI_VALUED = {"identityfile", "certificatefile", "localforward", "remoteforward", "dynamicforward", "sendenv", "setenv"}
# Every keyword OpenSSH's client accepts (as `ssh -G` prints them, plus the structural ones and
# those -G omits). Anything else is "Bad configuration option", exactly as ssh says.
KEYWORDS = frozenset((
    "addkeystoagent", "addressfamily", "batchmode", "bindaddress", "bindinterface", "canonicaldomains",
    "canonicalizefallbacklocal", "canonicalizehostname", "canonicalizemaxdots", "canonicalizepermittedcnames",
    "casignaturealgorithms", "certificatefile", "channeltimeout", "checkhostip", "ciphers", "clearallforwardings",
    "compression", "connectionattempts", "connecttimeout", "controlmaster", "controlpath", "controlpersist",
    "dynamicforward", "enableescapecommandline", "enablesshkeysign", "escapechar", "exitonforwardfailure",
    "fingerprinthash", "forkafterauthentication", "forwardagent", "forwardx11", "forwardx11timeout",
    "forwardx11trusted", "gatewayports", "globalknownhostsfile", "gssapiauthentication",
    "gssapidelegatecredentials", "gssapikexalgorithms", "gssapikeyexchange", "gssapirenewalforcesrekey",
    "gssapitrustdns", "hashknownhosts", "host", "hostbasedacceptedalgorithms", "hostbasedauthentication",
    "hostkeyalgorithms", "hostkeyalias", "hostname", "identitiesonly", "identityagent", "identityfile",
    "ignoreunknown", "include", "ipqos", "kbdinteractiveauthentication", "kbdinteractivedevices", "kexalgorithms",
    "knownhostscommand", "localcommand", "localforward", "loglevel", "logverbose", "macs", "match",
    "nohostauthenticationforlocalhost", "numberofpasswordprompts", "obscurekeystroketiming",
    "passwordauthentication", "permitlocalcommand", "permitremoteopen", "pkcs11provider", "port",
    "preferredauthentications", "proxycommand", "proxyjump", "proxyusefdpass", "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes", "pubkeyauthentication", "rekeylimit", "remotecommand", "remoteforward", "requesttty",
    "requiredrsasize", "revokedhostkeys", "securitykeyprovider", "sendenv", "serveralivecountmax",
    "serveraliveinterval", "sessiontype", "setenv", "stdinnull", "streamlocalbindmask", "streamlocalbindunlink",
    "stricthostkeychecking", "syslogfacility", "tag", "tcpkeepalive", "tunnel", "tunneldevice", "updatehostkeys",
    "user", "userknownhostsfile", "verifyhostkeydns", "visualhostkey", "xauthlocation"
))


@dataclass(frozen=True)
class Setting:
    """One keyword's value(s) and the ``file:line`` each came from."""

    values: tuple[str, ...]
    sources: tuple[str, ...]

    @property
    def value(self) -> str:
        return self.values[0]

    @property
    def source(self) -> str:
        return self.sources[0]


@dataclass
class ParsedConfig:
    """What the config files say about one host: keyword (lower case) -> setting."""

    settings: dict[str, Setting] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    def get(self, keyword: str) -> Setting | None:
        return self.settings.get(keyword)


def split_args(text: str, where: str) -> list[str]:
    """OpenSSH's argv_split (misc.c): words split on blanks; single or double quotes group; a
    backslash escapes a quote, a backslash or (outside quotes) a space; a ``#`` that starts a word
    ends the line."""
    words: list[str] = []
    index, length = 0, len(text)
    while index < length:
        if text[index] in " \t":
            index += 1
            continue
        if text[index] == "#":
            break
        word: list[str] = []
        quote = ""
        while index < length:
            char = text[index]
            following = text[index + 1] if index + 1 < length else ""
            if char == "\\" and (following in ("'", '"', "\\") or (not quote and following == " ")):
                word.append(following)
                index += 1
            elif not quote and char in " \t":
                break
            elif not quote and char in "'\"":
                quote = char
            elif quote and char == quote:
                quote = ""
            else:
                word.append(char)
            index += 1
        if quote:
            raise ConfigError(f"{where}: unbalanced quotes", hint="close the quote on that line")
        words.append("".join(word))
    return words


def _split_keyword(line: str) -> tuple[str, str]:
    """``Key value``, ``Key=value`` or ``Key = value`` -> (key, rest)."""
    line = line.strip()
    end = 0
    while end < len(line) and not line[end].isspace() and line[end] != "=":
        end += 1
    keyword, rest = line[:end], line[end:].lstrip()
    if rest.startswith("="):
        rest = rest[1:].lstrip()
    return keyword, rest


@functools.lru_cache(maxsize=1024)
def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


def wildcard_match(subject: str, pattern: str) -> bool:
    """OpenSSH's match_pattern: only ``*`` and ``?`` are special (``[`` is literal, as in
    ``[host]:port``), and the whole subject must match."""
    return _wildcard(pattern).fullmatch(subject) is not None


def pattern_list_matches(name: str, patterns: list[str], *, fold_case: bool = False) -> bool:
    """OpenSSH's match_pattern_list: a negated match vetoes, else any positive match wins."""
    subject = name.lower() if fold_case else name
    matched = False
    for raw in patterns:
        for pattern in raw.split(","):
            negated = pattern.startswith("!")
            pattern = pattern[1:] if negated else pattern
            if fold_case:
                pattern = pattern.lower()
            if pattern and wildcard_match(subject, pattern):
                if negated:
                    return False
                matched = True
    return matched


class _Reader:
    def __init__(self, host: str, local_user: str, home: Path, cli_user: str | None = None,
                 cli_hostname: str | None = None) -> None:
        self.original = host
        self.cli_user = cli_user  # `-l`: set before the files are read, so `Match user` sees it
        self.cli_hostname = cli_hostname
        self.local_user = local_user
        self.home = home
        self.result = ParsedConfig()
        self.ignore_unknown: list[str] = []

    # -- evaluating Host and Match -------------------------------------------------------------
    def _current_host(self) -> str:
        if self.cli_hostname:
            return self.cli_hostname.lower()
        given = self.result.get("hostname")
        return expand_hostname(given.value, self.original) if given else self.original

    def _match(self, words: list[str], where: str) -> bool:
        if not words:
            raise ConfigError(f"{where}: Match needs criteria", hint="write e.g. `Match host NAME`")
        result = True
        index = 0
        while index < len(words):
            word = words[index]
            negated = word.startswith("!")
            criterion = (word[1:] if negated else word).lower()
            if criterion == "all":
                verdict = True
                index += 1
            elif criterion in ("canonical", "final", "localnetwork", "tagged"):
                raise ConfigError(f"{where}: `Match {criterion}` needs the OpenSSH client",
                                  hint="install openssh-client so fleetctl can ask `ssh -G`")
            else:
                if index + 1 >= len(words):
                    raise ConfigError(f"{where}: Match {criterion} needs an argument")
                argument = words[index + 1]
                index += 2
                if criterion == "host":
                    verdict = pattern_list_matches(self._current_host(), [argument])
                elif criterion == "originalhost":
                    verdict = pattern_list_matches(self.original, [argument])
                elif criterion == "user":
                    user = self.result.get("user")
                    current = self.cli_user or (user.value if user else self.local_user)
                    verdict = pattern_list_matches(current, [argument])
                elif criterion == "localuser":
                    verdict = pattern_list_matches(self.local_user, [argument])
                elif criterion == "exec":
                    verdict = self._exec(argument)
                else:
                    raise ConfigError(f"{where}: unsupported Match criterion {criterion!r}")
            result = result and (verdict != negated)
        return result

    def _exec(self, command: str) -> bool:
        expanded = expand_tokens(command, self.original, self._current_host(), self.result)
        shell = os.environ.get("SHELL") or "/bin/sh"
        try:
            done = subprocess.run([shell, "-c", expanded], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    # -- reading files ---------------------------------------------------------------------------
    def read(self, path: Path, *, system: bool, active: bool = True, depth: int = 0) -> None:
        if depth > MAX_INCLUDE_DEPTH:
            raise ConfigError(f"{path}: Include nested deeper than {MAX_INCLUDE_DEPTH}", hint="look for an Include loop")
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        self.result.files.append(str(path))
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, rest = _split_keyword(line)
            key = keyword.lower()
            words = split_args(rest, where)
            if key == "host":
                active = pattern_list_matches(self.original, words)
                continue
            if key == "match":
                active = self._match(words, where)
                continue
            if key == "include":
                if active:
                    for pattern in words:
                        self._include(pattern, system=system, depth=depth)
                continue
            if key not in KEYWORDS:
                if pattern_list_matches(key, self.ignore_unknown, fold_case=True):
                    continue
                raise ConfigError(f"{where}: Bad configuration option: {keyword}",
                                  hint="fix or remove that line (`ssh -G HOST` says the same)")
            if not words:
                raise ConfigError(f"{where}: {keyword} has no value")
            if key == "ignoreunknown" and not self.ignore_unknown:
                self.ignore_unknown = words
            if active:
                self._set(key, words, where)

    def _include(self, pattern: str, *, system: bool, depth: int) -> None:
        expanded = os.path.expanduser(pattern) if pattern.startswith("~") else pattern
        if not os.path.isabs(expanded):
            base = SYSTEM_CONFIG.parent if system else self.home / ".ssh"
            expanded = str(base / expanded)
        for found in sorted(glob.glob(expanded)):
            self.read(Path(found), system=system, active=True, depth=depth + 1)

    def _set(self, key: str, words: list[str], where: str) -> None:
        # ProxyCommand and ProxyJump compete: whichever comes first wins (ssh_config(5)).
        rival = {"proxycommand": "proxyjump", "proxyjump": "proxycommand"}.get(key)
        if rival and rival in self.result.settings:
            return
        existing = self.result.settings.get(key)
        value = " ".join(words) if key in ("proxycommand", "remotecommand", "localcommand", "knownhostscommand") \
            else words[0] if key not in ("userknownhostsfile", "globalknownhostsfile", "sendenv", "setenv") \
            else " ".join(words)
        if key in MULTI_VALUED:  # "none" is kept as a value, as `ssh -G` shows it
            values = (existing.values if existing else ()) + (value,)
            sources = (existing.sources if existing else ()) + (where,)
            self.result.settings[key] = Setting(values, sources)
        elif existing is None:
            self.result.settings[key] = Setting((value,), (where,))


def expand_hostname(value: str, original: str) -> str:
    """HostName accepts ``%h`` (the name given) and ``%%``; OpenSSH lowercases the result."""
    return value.replace("%%", "\x00").replace("%h", original).replace("\x00", "%").lower()


def expand_tokens(text: str, original: str, hostname: str, parsed: ParsedConfig | None = None, *,
                  user: str | None = None, port: int | None = None) -> str:
    """The tokens OpenSSH expands in IdentityFile, CertificateFile and Match exec: %% %h %n %p %r
    %u %d %l %L %i; others are left as they are."""
    if "%" not in text:
        return text
    setting_user = parsed.get("user") if parsed else None
    setting_port = parsed.get("port") if parsed else None
    local_host = os.uname().nodename
    values = {"%": "%", "h": hostname, "n": original, "u": getpass.getuser(), "d": str(Path.home()),
              "r": user or (setting_user.value if setting_user else getpass.getuser()),
              "p": str(port or (setting_port.value if setting_port else 22)),
              "l": local_host, "L": local_host.split(".")[0], "i": str(os.getuid())}
    out: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "%" and index + 1 < len(text) and text[index + 1] in values:
            out.append(values[text[index + 1]])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def parse_config(host: str, config_file: Path | None = None, *, home: Path | None = None, user: str | None = None,
                 hostname: str | None = None) -> ParsedConfig:
    """What the user's config (or ``config_file``, as ``ssh -F`` would) and, without ``-F``, the
    system config say about ``host``; ``user``/``hostname`` are ``-l``/``-o HostName`` given on the
    command line. Raises ConfigError naming file and line for a bad line."""
    reader = _Reader(host, getpass.getuser(), home or Path.home(), user, hostname)
    if config_file is not None:
        if str(config_file) != "none":
            reader.read(Path(os.path.expanduser(str(config_file))), system=False)
    else:
        reader.read(reader.home / ".ssh" / "config", system=False)
        reader.read(SYSTEM_CONFIG, system=True)
    canonical = reader.result.get("canonicalizehostname")
    if canonical and canonical.value.lower() not in ("no", "false"):
        raise ConfigError(f"{canonical.source}: CanonicalizeHostname needs the OpenSSH client",
                          hint="install openssh-client so fleetctl can ask `ssh -G`")
    return reader.result
