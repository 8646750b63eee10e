"""Runs inside the guest as root: IPsec labs and the tool under test (see vmlab/__init__.py)."""
