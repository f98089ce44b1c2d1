"""Containers on a Kiln host: host, bootstrap and workload containers (see README.md)."""
