"""Small OCI images, built reproducibly and pushed to a registry (`kiln oci`).

Kiln's host containers (the admin container, test workloads) are images like any other:
`spec` reads an image spec, `build` stages Debian packages and files into one layer,
`layout` writes the OCI image layout byte for byte the same every time, `push` speaks the
registry API, and `registry` runs Debian's docker-registry on 127.0.0.1 for tests and labs.
See README.md in this folder.
"""

from __future__ import annotations
