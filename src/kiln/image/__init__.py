"""Byte formats Kiln writes and reads itself: GPT, dm-verity, grubenv, FAT lookup. Pure: no subprocesses."""
