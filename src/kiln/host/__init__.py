"""Everything that runs inside a Kiln image, and nothing else.

Nothing here may import the builder, the VM runner or the workstation CLI (enforced by
import-linter): this package is copied into the image as it is.
"""
