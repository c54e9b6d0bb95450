"""Logging in with keys the way OpenSSH's pubkey_prepare orders them.

1. ssh-agent keys, in the agent's order; an agent key that is also an IdentityFile takes that
   file's certificate; agent keys that are not IdentityFiles only without IdentitiesOnly.
2. Then the IdentityFiles in order (command-line/inventory key first), each with ``<key>-cert.pub``
   and any CertificateFile for the same key. Missing files are skipped, as ssh skips them.
Passwords are never used. When every key is refused the error lists what was tried and skipped.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field

import paramiko

from fleetctl.errors import AuthError
from fleetctl.ssh.config_file import expand_tokens
from fleetctl.ssh.known_hosts import fingerprint
from fleetctl.ssh.seam import DEFAULT_IDENTITY_FILES, Hop

# Loaded private keys by (path, mtime, cert mtime): a reconnect must not re-read and re-parse the file.
_key_cache: dict[tuple[str, int, int], paramiko.PKey] = {}
_key_cache_lock = threading.Lock()


@dataclass
class Candidate:
    label: str
    key: paramiko.PKey


@dataclass
class Identities:
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _AgentAt(paramiko.agent.AgentSSH):  # type: ignore[misc]
    """An agent at a given socket (IdentityAgent), not only $SSH_AUTH_SOCK."""

    def __init__(self, path: str) -> None:
        super().__init__()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(path)
        self._connect(sock)


def _agent_keys(hop: Hop, use_agent: bool) -> list[paramiko.PKey]:
    path = hop.identity_agent or os.environ.get("SSH_AUTH_SOCK")
    if not use_agent or not path or hop.identity_agent == "none":
        return []
    try:
        keys = list(_AgentAt(os.path.expanduser(path)).get_keys())
    except (paramiko.SSHException, OSError):
        return []  # no agent there: the key files may still do
    for key in keys:
        # paramiko before 5.0 gives an agent's key no ``public_blob``, and its login reads one: an
        # agent holding a certificate failed every login with AttributeError. 5.0 sets it to None on
        # every agent key; so do we, on these instances only (the key then signs as its own type).
        if not hasattr(key, "public_blob"):
            key.public_blob = None
    return keys


def _expand(hop: Hop, path: str) -> str:
    return os.path.expanduser(expand_tokens(path, hop.alias or hop.hostname, hop.hostname, user=hop.user, port=hop.port))


def _public_blob(path: str) -> bytes | None:
    """The public half of a key file (``.pub`` beside it), to match agent keys without the passphrase."""
    try:
        with open(path + ".pub", encoding="utf-8") as handle:
            parts = handle.read().split()
        return paramiko.PublicBlob.from_string(" ".join(parts[:2])).key_blob if len(parts) >= 2 else None
    except (OSError, ValueError, paramiko.SSHException):
        return None


def _load(path: str) -> paramiko.PKey | None:
    """The private key at ``path`` (with ``-cert.pub`` if present), or None when passphrase-protected."""
    stamp = os.stat(path).st_mtime_ns
    try:
        cert_stamp = os.stat(path + "-cert.pub").st_mtime_ns
    except OSError:
        cert_stamp = 0
    cache_key = (path, stamp, cert_stamp)
    with _key_cache_lock:
        cached = _key_cache.get(cache_key)
    if cached is not None:
        return cached
    try:
        key = paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):
        return None
    with _key_cache_lock:
        _key_cache[cache_key] = key
    return key


def _describe(key: paramiko.PKey) -> str:
    blob = key.asbytes()
    return f"{key.get_name()} {fingerprint(blob)}"


def identities(hop: Hop, *, use_agent: bool = True) -> Identities:
    found = Identities()
    files: list[tuple[str, bytes | None, paramiko.PKey | None]] = []
    # The inventory's key first, even where `ssh -G` dropped it for not existing: it is then named as skipped.
    for raw in dict.fromkeys(((hop.key_path,) if hop.key_path else ()) + hop.identities):
        if raw.lower() == "none":
            continue
        path = _expand(hop, raw)
        if not os.path.exists(path):
            if os.path.exists(path + ".pub"):
                files.append((raw, _public_blob(path), None))  # the agent may hold its private half
            elif raw not in DEFAULT_IDENTITY_FILES:
                found.skipped.append(f"{raw} (not found)")
            continue
        try:
            key = _load(path)
        except (paramiko.SSHException, ValueError, OSError) as exc:
            found.skipped.append(f"{raw} (unusable: {type(exc).__name__})")
            continue
        blob = key.asbytes() if key is not None else _public_blob(path)
        files.append((raw, blob, key))
    _attach_certificates(hop, files, found)
    for agent_key in _agent_keys(hop, use_agent):
        match = next((entry for entry in files if entry[1] == agent_key.asbytes()), None)
        if match is not None:
            files.remove(match)
            found.candidates.append(Candidate(f"{match[0]} via ssh-agent ({_describe(agent_key)})", agent_key))
        elif not hop.identities_only:
            comment = getattr(agent_key, "comment", "") or ""
            found.candidates.append(Candidate(f"ssh-agent key {comment!r} ({_describe(agent_key)})".replace(" ''", ""),
                                              agent_key))
    for raw, _blob, key in files:
        if key is None:
            found.skipped.append(f"{raw} (passphrase-protected and not in ssh-agent)")
            continue
        certified = " with certificate" if key.public_blob is not None else ""
        found.candidates.append(Candidate(f"{raw}{certified} ({key.get_name()})", key))
    return found


def _attach_certificates(hop: Hop, files: list[tuple[str, bytes | None, paramiko.PKey | None]], found: Identities) -> None:
    """CertificateFile: a certificate for one of the identity keys (OpenSSH pairs them by key)."""
    for raw in hop.certificate_files:
        if raw.lower() == "none":
            continue
        path = _expand(hop, raw)
        try:
            cert = paramiko.PublicBlob.from_file(path)
        except (OSError, ValueError, paramiko.SSHException):
            found.skipped.append(f"certificate {raw} (not found or unreadable)")
            continue
        owner = next((key for _raw, _blob, key in files if key is not None and _certifies(cert, key)), None)
        if owner is None:
            found.skipped.append(f"certificate {raw} (no IdentityFile holds its private key)")
            continue
        owner.load_certificate(path)


# How many wire fields follow the nonce in a certificate for each plain key type (PROTOCOL.certkeys).
_CERT_KEY_FIELDS = {"ssh-ed25519": 1, "ecdsa-sha2-nistp256": 2, "ecdsa-sha2-nistp384": 2, "ecdsa-sha2-nistp521": 2,
                    "ssh-rsa": 2}


def _certifies(cert: paramiko.PublicBlob, key: paramiko.PKey) -> bool:
    """A certificate embeds the public key it certifies right after its nonce: rebuild that plain
    public key blob and compare it with the private key's own."""
    plain_type = cert.key_type.removesuffix("-cert-v01@openssh.com")
    fields = _CERT_KEY_FIELDS.get(plain_type)
    if fields is None or plain_type != key.get_name():
        return False
    try:
        message = paramiko.Message(cert.key_blob)
        message.get_text()  # the certificate type
        message.get_string()  # the nonce
        plain = paramiko.Message()
        plain.add_string(plain_type)
        for _ in range(fields):
            plain.add_string(message.get_string())
    except (paramiko.SSHException, ValueError, IndexError):
        return False
    return bool(plain.asbytes() == key.asbytes())


def authenticate(transport: paramiko.Transport, hop: Hop, is_bastion: bool, *, use_agent: bool = True) -> str:
    """Log in to ``hop`` on an established transport; returns the label of the key that worked."""
    found = identities(hop, use_agent=use_agent)
    skipped = f"; skipped {', '.join(found.skipped)}" if found.skipped else ""
    if not found.candidates:
        raise AuthError(f"no usable key for {hop.address}{skipped}", hop=hop.address, is_bastion=is_bastion,
                        hint="set ssh_key_path or IdentityFile, or load the key into ssh-agent (`ssh-add KEY`)")
    for candidate in found.candidates:
        try:
            remaining = transport.auth_publickey(hop.user, candidate.key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthError(f"{hop.address} does not accept public-key login (it offers {', '.join(exc.allowed_types)})",
                            hop=hop.address, is_bastion=is_bastion, hint="enable PubkeyAuthentication on the host") from exc
        except paramiko.AuthenticationException:
            continue
        if remaining:
            raise AuthError(f"{hop.address} wants more than a key ({', '.join(remaining)})", hop=hop.address,
                            is_bastion=is_bastion, hint="fleetctl logs in with a key alone; relax AuthenticationMethods")
        return candidate.label
    tried = ", ".join(c.label for c in found.candidates)
    raise AuthError(f"{hop.address} refused every key as user {hop.user!r}: tried {tried}{skipped}", hop=hop.address,
                    is_bastion=is_bastion, hint="add the public key to the host's authorized_keys, or fix the user, "
                                                "ssh_key_path or IdentityFile")
