"""imc: image caches and snapshot volumes built from real OCI registries."""

__version__ = "0.1.0"
