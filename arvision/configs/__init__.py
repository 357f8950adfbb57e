"""Packaged default configs and recipes (YAML); see arvision.config."""
