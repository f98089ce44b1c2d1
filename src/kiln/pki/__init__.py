"""The fleet PKI for Kiln's mutual-TLS remote API (Talos-style), on the workstation.

One CA per fleet signs a server certificate that nodes present and client certificates
whose subject carries the caller's role (`O=kiln:admin` or `O=kiln:reader`). The node side
(`kiln.host.api.tls`) needs only the standard library; this side uses `cryptography`, so
import it lazily from commands. See README.md in this folder.
"""

from __future__ import annotations

from kiln.pki.fleet import (
    CA_DAYS,
    DEFAULT_PORT,
    LEAF_DAYS,
    ROLE_PREFIX,
    ROLES,
    ClientCert,
    Issued,
    Layout,
    PkiInit,
    Role,
    client_context,
    init,
    issue_client,
    user_data,
)

__all__ = [
    "CA_DAYS",
    "DEFAULT_PORT",
    "LEAF_DAYS",
    "ROLES",
    "ROLE_PREFIX",
    "ClientCert",
    "Issued",
    "Layout",
    "PkiInit",
    "Role",
    "client_context",
    "init",
    "issue_client",
    "user_data",
]
