"""xfrmtrace: trace every Linux XFRM (IPsec) error counter increment to its packet."""

__version__ = "0.1.0"
