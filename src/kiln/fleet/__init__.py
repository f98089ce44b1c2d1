"""Fleet coordination on the workstation side: `kiln fleet serve` (FleetLock over etcd)."""
