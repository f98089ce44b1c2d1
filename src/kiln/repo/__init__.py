"""The TUF update repository, on the workstation (Bottlerocket's tuftool + updata).

`kiln repo` creates a repository of signed TUF metadata (python-tuf's Metadata API,
ed25519 keys), publishes builds as releases in its `manifest.json` target, re-signs,
rotates keys, serves it over HTTP and checks it the way a host does. Modules import
python-tuf and securesystemslib lazily. See README.md in this folder.
"""

from __future__ import annotations
