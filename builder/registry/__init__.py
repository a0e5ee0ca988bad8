"""Talking to OCI registries: per-endpoint transport policy, auth, and the client."""
