"""The workstation CLI: argparse front, one module per command group."""
