"""Stage 4, tracing: the BPF object loaded, probes attached at the resolved sites, raw
events out of the ring buffer.

- :mod:`.tracer`: load, fill the maps, attach and detach, read counts and the ring buffer.
- :mod:`.modulesites`: modules that load or unload while tracing get their probes.
"""
