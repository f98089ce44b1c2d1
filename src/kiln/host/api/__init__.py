"""The host API: settings over a Unix socket, and the mutual-TLS remote API."""
