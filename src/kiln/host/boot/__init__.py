"""Boot pipeline steps that run in the host: readiness, slot confirmation, DATA growth."""
