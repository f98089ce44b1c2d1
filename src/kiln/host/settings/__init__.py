"""Settings: the typed model (model), dotted keys and tree operations (keys), and the
definitions that tie settings to services and configuration files (definitions)."""
