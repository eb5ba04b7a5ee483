"""API keys and namespaces: which prompts a bearer key may see and use, and whether it may change the store.

A keys file (YAML or JSON, ``promcse serve --keys FILE``) maps each API key to what it may do::

    "sk-alice-7f3a": {prompts: ["alice-*", "shared-*"], admin: true}
    "sk-bob-91c2":   {prompts: ["bob-*"]}
    "sk-prom-0c1d":  {prompts: [], metrics: true}

``prompts`` is a list of shell-style globs over model names (:func:`fnmatch.fnmatchcase`: ``*``, ``?``,
``[abc]``; case-sensitive), ``admin`` (default false) allows the admin routes (``PUT``/``DELETE
/v1/prompts/NAME``) for names inside those globs, ``metrics`` (default false) allows ``GET /metrics`` (whose
labels name models of every namespace). A name outside a key's globs does not exist for that key: every route
answers 404 for it, exactly as for a name that is nowhere, and no listing shows it.

The single ``api_key`` of :class:`promcse.serving.context.ServeOptions` is the key ``{prompts: ["*"], admin:
false, metrics: true}``: every prompt and the metrics, no admin. Keys are kept as SHA-256 digests only (no key in a repr, a log line or a
pickled Ray replica spec) and compared in constant time against every configured key (:func:`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from promcse.errors import PromcseError

MAX_KEYS_FILE_BYTES = 1_000_000


@dataclass(frozen=True)
class Tenant:
    """What one key may do: the globs of the model names it sees, whether it may write the store, read metrics."""

    prompts: tuple[str, ...] = ("*",)
    admin: bool = False
    metrics: bool = False

    def sees(self, name: str) -> bool:
        """True when ``name`` matches one of the tenant's globs."""
        return any(fnmatchcase(name, glob) for glob in self.prompts)


EVERYTHING = Tenant(("*",), admin=False, metrics=True)  # the single api_key
METRICS_ONLY = Tenant((), admin=False, metrics=True)  # the metrics key: /metrics and nothing else


def digest(key: str | bytes) -> bytes:
    """SHA-256 of a key (its UTF-8 bytes): what a :class:`KeyRing` keeps instead of the key."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


@dataclass(frozen=True)
class KeyRing:
    """The configured API keys (as digests) and their tenants."""

    entries: tuple[tuple[bytes, Tenant], ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.entries)

    def tenant_for(self, authorization: bytes) -> Tenant | None:
        """The tenant of an ``Authorization: Bearer KEY`` header value, None for a missing or unknown key.

        Every configured key is compared (constant time per key, no early exit), so the time taken does not
        depend on which key matched or how much of one did.
        """
        token = authorization[len(b"Bearer "):] if authorization.startswith(b"Bearer ") else b""
        given, found = digest(token), None
        for key_digest, tenant in self.entries:
            if hmac.compare_digest(given, key_digest) and token:
                found = tenant
        return found

    def with_key(self, key: str, tenant: Tenant) -> KeyRing:
        """This ring plus ``key`` (refused when the key is already configured)."""
        if any(hmac.compare_digest(digest(key), d) for d, _ in self.entries):
            raise PromcseError("the same API key is configured twice", key="keys")
        return KeyRing((*self.entries, (digest(key), tenant)))


def _tenant(spec: Any, where: str, path: Path) -> Tenant:
    """One key's entry of a keys file, strictly checked."""
    if not isinstance(spec, dict) or set(spec) - {"prompts", "admin", "metrics"} or "prompts" not in spec:
        raise PromcseError(f"{where}: expected {{prompts: [glob, ...], admin: bool, metrics: bool}} (admin, metrics "
                           "optional)", path=path, key="keys")
    globs, admin, metrics = spec["prompts"], spec.get("admin", False), spec.get("metrics", False)
    if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
        raise PromcseError(f"{where}: 'prompts' must be a list of non-empty glob strings", path=path, key="keys")
    if not isinstance(admin, bool) or not isinstance(metrics, bool):
        raise PromcseError(f"{where}: 'admin' and 'metrics' must be true or false", path=path, key="keys")
    return Tenant(tuple(globs), admin, metrics)


def check_key_text(key: object, where: str, path: Path | None = None, option: str = "keys") -> str:
    """A key a header can carry: printable, no spaces (never echoed in the error, which names ``option``)."""
    if not isinstance(key, str) or not key or any(c.isspace() or not c.isprintable() for c in key):
        raise PromcseError(f"{where}: a key must be printable characters without spaces", path=path, key=option)
    return key


def read_keys(path: str | Path) -> KeyRing:
    """Read a keys file (YAML, or JSON, which YAML reads too): ``{KEY: {prompts: [...], admin: bool, metrics: bool}}``.

    Raises:
        PromcseError: Unreadable file, wrong shape, a key no header can carry (the key is never quoted).
    """
    import yaml

    from promcse.io.schema import read_regular_file

    file = Path(path)
    raw = read_regular_file(file, MAX_KEYS_FILE_BYTES)
    try:
        data = yaml.safe_load(raw.decode("utf-8")) if file.suffix != ".json" else json.loads(raw)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromcseError(f"not valid YAML/JSON ({type(err).__name__})", path=file, key="keys") from None
    if not isinstance(data, dict) or not data:
        raise PromcseError("expected a non-empty mapping of API keys to {prompts: [...], admin: bool}", path=file,
                           key="keys")
    ring = KeyRing()
    for number, (key, spec) in enumerate(data.items(), start=1):
        where = f"key #{number}"
        ring = ring.with_key(check_key_text(key, where, file), _tenant(spec, where, file))
    return ring


def key_ring(keys: KeyRing | None, api_key: str | None) -> KeyRing | None:
    """The server's keys: ``keys`` (a keys file's), plus ``api_key`` as an every-prompt, non-admin key unless it is
    already one of them; None when there are none (the server is open)."""
    ring = keys or KeyRing()
    if api_key and ring.tenant_for(b"Bearer " + api_key.encode("utf-8")) is None:
        ring = ring.with_key(api_key, EVERYTHING)
    return ring if len(ring) else None
