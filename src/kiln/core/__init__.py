"""Shared plumbing: user errors, the subprocess gateway, atomic file writes, progress."""
