"""Following the kernel's SAD, SPD and tc over netlink, with keys redacted (see model.py)."""
