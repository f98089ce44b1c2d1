"""Secure Boot on the workstation: the key hierarchy, signed EFI binaries, firmware variables.

`keys` makes and loads a key directory (`kiln keys init`), `pe` signs and verifies EFI
binaries for the firmware's db, `varstore` writes and reads the OVMF variables file with
those keys enrolled. Nothing here ships in the image: the host reports what the firmware
did through kiln.host.secureboot, which reads efivarfs and needs none of this.
"""
