"""Stage 6, context: the SAD/SPD behind an event, and why its counter moved.

- :mod:`.xfrmnl`: NETLINK_XFRM (and tc) of every namespace: messages, model (keys
  redacted), changes, the per-namespace mirror, the listener that follows them.
- :mod:`.explain`: an explanation for an event from what the mirror held at that moment.
"""
