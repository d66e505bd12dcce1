"""Who is calling: every RPC of the Sandbox service is authenticated as a tenant, or refused.

Sources of identity, in order:
1. A bearer token (`authorization: Bearer <token>` metadata) on any listener. Tokens are stored
   in the server config only as sha256 hex; a token that matches no tenant is refused outright,
   even when the connection would otherwise identify someone (a wrong token is never ignored).
2. The unix socket peer's uid (SO_PEERCRED). gRPC Python cannot see it, so the public socket is
   served by unix_front.py, which reads SO_PEERCRED and reconnects to the internal gRPC socket
   from an address that encodes the uid, in a directory only the daemon can reach. That address
   is what `context.peer()` shows; any other unix peer is not trusted.
3. The TLS client certificate (mutual TLS): its subject CN or any SAN value.
Tenants and their identities come from the server config on every call, so a reload that
rotates tokens takes effect at once. Anything else is Unauthenticated (UNAUTHENTICATED).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Callable

from sandboxd.errors import SandboxError


class Unauthenticated(SandboxError):
    """No credentials, or credentials that name no tenant (gRPC UNAUTHENTICATED)."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def peer_address_name(uid: int, gid: int, pid: int) -> str:
    """The file name unix_front binds its upstream socket to; parsed back by `Authenticator`."""
    return f"{uid}.{gid}.{pid}.{os.urandom(8).hex()}"


class Authenticator:
    def __init__(self, config: Callable[[], Any], peer_dir: str | None) -> None:
        self._config = config          # returns the current ServerConfig (reload-safe)
        self.peer_dir = peer_dir       # where unix_front binds; None: no unix listener

    def identify(self, context: Any) -> "Identity":
        from sandboxd.engine.service import Identity
        tenants = self._config().tenants
        md = context.invocation_metadata() or ()
        auth = [v for k, v in md if k == "authorization"]
        if auth:
            if len(auth) > 1:
                raise Unauthenticated("more than one authorization header", step="authenticate")
            value = auth[0] if isinstance(auth[0], str) else auth[0].decode("latin-1")
            scheme, _, token = value.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must be 'Bearer <token>'", step="authenticate")
            digest = token_hash(token.strip())
            for name, t in tenants.items():
                for h in t.token_sha256:
                    if hmac.compare_digest(h, digest):
                        return Identity(name, "token", self._peer_desc(context))
            raise Unauthenticated("bearer token matches no tenant", step="authenticate")

        peer = context.peer() or ""
        if peer.startswith("unix:"):
            uid, desc = self._unix_peer(peer[len("unix:"):])
            if uid is None:
                raise Unauthenticated("unix peer not identified (connect through the public "
                                      "socket)", step="authenticate")
            for name, t in tenants.items():
                if uid in t.unix_uids:
                    return Identity(name, "unix_peer", desc)
            raise Unauthenticated(f"unix peer uid {uid} is not a tenant", step="authenticate",
                                  hint="map the uid in the server config (tenants.<name>.unix_uids) "
                                       "or send a bearer token")

        ac = context.auth_context() or {}
        if ac.get("transport_security_type") == [b"ssl"]:
            names = [v.decode("utf-8", "replace") for key in ("x509_common_name",
                                                             "x509_subject_alternative_name")
                     for v in ac.get(key, [])]
            if not names:
                raise Unauthenticated("no client certificate; send a bearer token",
                                      step="authenticate")
            matches = {name for name, t in tenants.items() for n in names if n in t.tls_identities}
            if len(matches) == 1:
                tenant = matches.pop()
                return Identity(tenant, "tls", f"{peer} cert={','.join(names)}")
            if matches:
                raise Unauthenticated(f"client certificate names several tenants ({', '.join(sorted(matches))})",
                                      step="authenticate")
            raise Unauthenticated(f"client certificate {', '.join(names)} is not a tenant",
                                  step="authenticate")
        raise Unauthenticated("no credentials", step="authenticate")

    def _unix_peer(self, path: str) -> tuple[int | None, str]:
        if not self.peer_dir or os.path.dirname(path) != self.peer_dir:
            return None, path
        parts = os.path.basename(path).split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            return None, path
        uid, gid, pid = (int(p) for p in parts[:3])
        return uid, f"unix uid={uid} gid={gid} pid={pid}"

    def _peer_desc(self, context: Any) -> str:
        peer = context.peer() or ""
        if peer.startswith("unix:"):
            return self._unix_peer(peer[5:])[1]
        return peer
