"""Stage 5, decoding: ring-buffer records become :class:`~.events.XfrmErrorEvent` values.

- :mod:`.events`: ``struct xt_event`` -> event (site, counter, netns, packet or flow).
- :mod:`.packet`: pure decoders of the packet bytes (IPv4/IPv6, ESP, AH, IPComp, UDP encap).
"""
