"""Tools for preparing and running on an offline GPU machine (see tools/gpu/README.md)."""
