"""The fleet PKI for Kiln's mutual-TLS remote API (Talos-style), on the workstation.

One CA per fleet signs a server certificate per node (its name and addresses) and client
certificates whose subject carries the caller's role (`O=kiln:admin` or `O=kiln:reader`),
and keeps a CRL that nodes and clients both honour. The node side (`kiln.host.api.tls`)
needs only the standard library; this side uses `cryptography`, so import it lazily from
commands. See README.md in this folder.
"""

from __future__ import annotations

from kiln.pki.fleet import (
    CA_DAYS,
    DEFAULT_PORT,
    LEAF_DAYS,
    LOCAL_ADDRESSES,
    LOCAL_NODE,
    ROLE_PREFIX,
    ROLES,
    ClientCert,
    Issued,
    Layout,
    NodeCert,
    PkiInit,
    Role,
    client_context,
    init,
    issue_client,
    issue_node,
    node_for_user_data,
    user_data,
)
from kiln.pki.revoke import Revoked, crl_toml, revoke

__all__ = [
    "CA_DAYS",
    "DEFAULT_PORT",
    "LEAF_DAYS",
    "LOCAL_ADDRESSES",
    "LOCAL_NODE",
    "ROLES",
    "ROLE_PREFIX",
    "ClientCert",
    "Issued",
    "Layout",
    "NodeCert",
    "PkiInit",
    "Revoked",
    "Role",
    "client_context",
    "crl_toml",
    "init",
    "issue_client",
    "issue_node",
    "node_for_user_data",
    "revoke",
    "user_data",
]
