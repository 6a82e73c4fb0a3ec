"""FUSE front: translates pyfuse3 calls onto the union view."""
