"""Runs on the lab host: kernel packages and the qemu runner (see vmlab/__init__.py)."""
