"""VM lab: boot real Debian kernels under qemu (virtme-ng) and drive IPsec scenarios in them.

Modules, one concern each:

- :mod:`tests.vmlab.kernels` resolves, downloads and unpacks Debian kernel packages (host side).
- :mod:`tests.vmlab.vm` boots such a kernel with the host's root filesystem and runs a command.
- :mod:`tests.vmlab.ipsec` builds network-namespace IPsec labs; it runs *inside* the guest.
"""
