"""ssh_config resolution compared field by field with OpenSSH itself (`ssh -G`), the oracle.

OpenSSH reads ~/.ssh from the passwd entry, not $HOME, so the oracle runs in a private mount
namespace with the test's isolated home bind-mounted over the passwd home: both sides then read
the same files. fleetctl's own reader (the fallback when no ssh client is installed) must agree
with `ssh -G` on every field below, or refuse with one line naming the keyword it cannot honour.
The exact resolver (`ssh -G` itself) is checked for ProxyJump recursion: each hop again through
the config, as ssh does it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetctl.errors import ConfigError
from fleetctl.ssh.config_file import parse_config
from fleetctl.ssh.resolve import SshConfigResolver, SshOptions

pytestmark = [pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ssh"),
                                 reason="the oracle needs root (a private mount namespace) and OpenSSH's client"),
              pytest.mark.no_store]  # never opens a store: the PostgreSQL pass deselects it

PASSWD_HOME = pwd.getpwuid(os.getuid()).pw_dir
FIELDS = ("hostname", "user", "port", "identityfile", "certificatefile", "identitiesonly", "proxyjump", "proxycommand",
          "hostkeyalias", "stricthostkeychecking", "connecttimeout")
REFUSED_BY_NAME = ("Match canonical", "Match final", "CanonicalizeHostname")

# name -> (files under ~/.ssh, hosts to ask about [(host, extra ssh args)])
CORPUS: dict[str, tuple[dict[str, str], list[tuple[str, list[str]]]]] = {
    "include relative glob, and inside a Host block": ({
        "config": "Include conf.d/*.conf\nHost gpu*\n  Include hosts.d/gpu.conf\nHost *\n  User fallback\n",
        "conf.d/10-lab.conf": "Host lab\n  HostName lab.example\n  Port 2200\n",
        "conf.d/20-more.conf": "Host lab more\n  User first-include-wins\n",
        "hosts.d/gpu.conf": "  IdentityFile ~/.ssh/gpu_key\n  User gpuuser\n",
    }, [("lab", []), ("more", []), ("gpu7", []), ("other", [])]),
    "match host, originalhost, user, localuser, all, exec and negation": ({
        "config": ("Host alias\n  HostName 10.1.2.3\n"
                   "Match host 10.1.* originalhost alias\n  Port 1111\n"
                   "Match originalhost m2 exec \"true\"\n  User execuser\n"
                   "Match originalhost m3 !exec \"false\"\n  User notfalse\n"
                   "Match user root localuser root\n  ConnectTimeout 7\n"
                   "Match all\n  IdentitiesOnly yes\n"),
    }, [("alias", []), ("m2", []), ("m3", []), ("10.1.9.9", []), ("x", ["-l", "bob"])]),
    "wildcards, negation, Host * first and last, case": ({
        "config": ("Host *\n  ConnectTimeout 5\n"
                   "Host *.lab !bad.lab\n  User labuser\n"
                   "Host gpu?? GPU5\n  HostName %h.Example.COM\n"
                   "Host *\n  User last\n  Port 22\n"),
    }, [("x.lab", []), ("bad.lab", []), ("gpu12", []), ("GPU5", []), ("gpu5", []), ("plain", [])]),
    "tokens, several IdentityFile, IdentitiesOnly, CertificateFile": ({
        "config": ("Host gpu3\n  HostName 10.2.0.3\n  User alice\n"
                   "  IdentityFile ~/.ssh/missing\n  IdentityFile ~/.ssh/%h_%r_%p_%n\n  IdentityFile \"/keys/with space\"\n"
                   "  IdentitiesOnly yes\n  CertificateFile ~/.ssh/%r-cert.pub\n  CertificateFile none\n"),
    }, [("gpu3", []), ("gpu3", ["-i", "/cli/key", "-l", "cliuser", "-p", "2022"])]),
    "ProxyJump to aliases, nested, none, and ProxyCommand": ({
        "config": ("Host bastion\n  HostName 203.0.113.1\n  User jumper\n  Port 2424  # lab\n"
                   "  IdentityFile ~/.ssh/bastion_key\n"
                   "Host inner\n  HostName 10.0.0.1\n  ProxyJump bastion\n"
                   "Host deep\n  HostName 10.9.0.1\n  ProxyJump bastion,inner\n"
                   "Host cf-*\n  ProxyCommand cloudflared access ssh --hostname %h --port %p\n"
                   "Host both\n  ProxyCommand nc %h %p\n  ProxyJump bastion\n"
                   "Host direct\n  ProxyJump none\n"
                   "Host * !bastion !inner\n  ProxyJump bastion\n"),
    }, [("bastion", []), ("inner", []), ("deep", []), ("cf-1", []), ("both", []), ("direct", []),
        ("elsewhere", []), ("elsewhere", ["-J", "a@b:2,c"])]),
    "= syntax, quoting, comments, keyword case": ({
        "config": ("# a comment\n\nHOST eq\n  hostname=10.0.0.6\n  PORT = 2200\n  user\t\"quoted user\"\n"
                   "  StrictHostKeyChecking=yes # trailing\n  HostKeyAlias\tgpu-alias\n"
                   "  IdentityFile \"/path/with #hash\"\n"),
    }, [("eq", [])]),
    "IgnoreUnknown": ({
        "config": "IgnoreUnknown UseKeychain,AddKeys*\nHost *\n  UseKeychain yes\n  AddKeysFancy yes\n  User ok\n",
    }, [("x", [])]),
}


def _write(home: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = home / ".ssh" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def openssh(home: Path, host: str, args: list[str]) -> tuple[int, dict[str, list[str]], str]:
    """`ssh -G` with ``home`` mounted over the passwd home, in a private mount namespace."""
    command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
               "sh", str(home), PASSWD_HOME, "ssh", "-G", "-F", str(home / ".ssh" / "config"), *args, "--", host]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30, check=False)
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        values.setdefault(key, []).append(value.replace(PASSWD_HOME, str(home)))
    return done.returncode, values, done.stderr


def fleetctl_view(home: Path, host: str, args: list[str]) -> dict[str, list[str]]:
    """fleetctl's own reader, in `ssh -G` terms (command-line options applied the same way)."""
    options = dict(zip(args[::2], args[1::2], strict=True))
    resolver = SshConfigResolver(home / ".ssh" / "config", ssh_binary="")
    resolved = resolver.resolve(host, SshOptions(user=options.get("-l"), port=int(options["-p"]) if "-p" in options else None,
                                                 identity_files=(options["-i"],) if "-i" in options else (),
                                                 jump=options.get("-J")))

    return {
        "hostname": [resolved.hostname], "user": [resolved.user], "port": [str(resolved.port)],
        "identityfile": list(resolved.identity_files), "certificatefile": list(resolved.certificate_files),
        "identitiesonly": ["yes" if resolved.identities_only else "no"],
        "proxyjump": [",".join(resolved.proxy_jump)] if resolved.proxy_jump else [],
        "proxycommand": [resolved.proxy_command] if resolved.proxy_command else [],
        "hostkeyalias": [resolved.host_key_alias] if resolved.host_key_alias else [],
        "stricthostkeychecking": [resolved.strict_host_key_checking],
        "connecttimeout": ["none" if resolved.connect_timeout is None else f"{resolved.connect_timeout:g}"],
    }


def _normalise(field: str, values: list[str]) -> list[str]:
    if field == "connecttimeout":
        return [v.removesuffix(".0") for v in values]
    if field == "stricthostkeychecking":
        return [{"true": "yes", "false": "no"}.get(v, v) for v in values]
    return values


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_fleetctl_reads_ssh_config_exactly_as_openssh(case: str, isolated_env: Path) -> None:
    files, queries = CORPUS[case]
    _write(isolated_env, files)
    for host, args in queries:
        code, expected, stderr = openssh(isolated_env, host, args)
        assert code == 0, f"{case}: ssh -G {host} failed: {stderr}"
        try:
            actual = fleetctl_view(isolated_env, host, args)
        except ConfigError as exc:
            assert any(name in str(exc) for name in REFUSED_BY_NAME), f"{case}/{host}: refused without naming why: {exc}"
            continue
        for field in FIELDS:
            want = _normalise(field, expected.get(field, []))
            if field in ("proxyjump", "proxycommand", "hostkeyalias") and want == ["none"]:
                want = []
            assert _normalise(field, actual[field]) == want, f"{case}: {host} {' '.join(args)}: {field}"


def test_a_bad_line_is_one_error_naming_file_and_line_like_openssh(isolated_env: Path) -> None:
    _write(isolated_env, {"config": "Host other\n  Bogus yes\nHost *\n  Port 22\n"})
    code, _values, stderr = openssh(isolated_env, "x", [])
    assert code != 0 and "line 2: Bad configuration option: bogus" in stderr
    with pytest.raises(ConfigError, match=r"config:2: Bad configuration option: Bogus"):
        parse_config("x", isolated_env / ".ssh" / "config", home=isolated_env)
    with pytest.raises(ConfigError, match=r"line 2: Bad configuration option: bogus"):
        SshConfigResolver(isolated_env / ".ssh" / "config").resolve("x")


def test_unsupported_match_criteria_are_refused_by_name(isolated_env: Path) -> None:
    _write(isolated_env, {"config": "Match canonical\n  User c\n"})
    with pytest.raises(ConfigError, match="Match canonical"):
        parse_config("x", isolated_env / ".ssh" / "config", home=isolated_env)


@pytest.mark.parametrize("exact", [True, False], ids=["ssh -G", "fleetctl subset"])
def test_proxyjump_hops_are_resolved_again_through_the_config(exact: bool, isolated_env: Path) -> None:
    _write(isolated_env, CORPUS["ProxyJump to aliases, nested, none, and ProxyCommand"][0])
    resolver = SshConfigResolver(isolated_env / ".ssh" / "config", ssh_binary=None if exact else "")
    chain = resolver.chain("deep")
    # deep -> ProxyJump bastion,inner: `ssh -J bastion inner -W deep`; inner is reached through bastion.
    assert [h.address for h in chain] == ["jumper@203.0.113.1:2424", "root@10.0.0.1:22", "root@10.9.0.1:22"]
    assert chain[0].identity_files == ("~/.ssh/bastion_key",)  # the alias's own key, not the target's
    assert [h.address for h in resolver.chain("direct")] == ["root@direct:22"]  # ProxyJump none
    both = resolver.chain("both")
    assert len(both) == 1 and both[0].proxy_command == "nc %h %p"  # first of ProxyCommand/ProxyJump wins


def test_proxyjump_loops_and_depth_are_refused(isolated_env: Path) -> None:
    _write(isolated_env, {"config": "Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n"})
    with pytest.raises(ConfigError, match="ProxyJump loop"):
        SshConfigResolver(isolated_env / ".ssh" / "config").chain("a")
    chain = "".join(f"Host h{i}\n  ProxyJump h{i + 1}\n" for i in range(20))
    _write(isolated_env, {"config": chain})
    with pytest.raises(ConfigError, match="longer than"):
        SshConfigResolver(isolated_env / ".ssh" / "config").chain("h0")


def test_inventory_fields_win_like_command_line_options(isolated_env: Path) -> None:
    _write(isolated_env, {"config": "Host gpu\n  HostName 10.0.0.5\n  User cfguser\n  Port 2200\n  IdentityFile ~/.ssh/cfg\n"})
    key = isolated_env / "inv_key"
    key.touch()
    for exact in (True, False):
        resolver = SshConfigResolver(isolated_env / ".ssh" / "config", ssh_binary=None if exact else "")
        hop = resolver.resolve("gpu", SshOptions(user="inv", port=22, identity_files=(str(key),), hostname="10.9.9.9"))
        assert (hop.hostname, hop.user, hop.port) == ("10.9.9.9", "inv", 22)
        assert hop.identity_files == (str(key), "~/.ssh/cfg")
        assert hop.sources["user"] == "inventory" and hop.sources["identity_files"] == "inventory"
    plain = SshConfigResolver(isolated_env / ".ssh" / "config", enabled=False).resolve("gpu")
    assert (plain.hostname, plain.port) == ("gpu", 22)  # ssh_config = false: the config is not read


def test_provenance_names_file_and_line(isolated_env: Path) -> None:
    _write(isolated_env, CORPUS["include relative glob, and inside a Host block"][0])
    hop = SshConfigResolver(isolated_env / ".ssh" / "config").resolve("lab")
    assert hop.sources["hostname"].endswith("conf.d/10-lab.conf:2")
    assert hop.sources["port"].endswith("conf.d/10-lab.conf:3")
    assert hop.sources["user"].endswith("conf.d/20-more.conf:2")
