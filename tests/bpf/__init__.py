"""A small BPF object (selftest.bpf.c) that exercises the libbpf binding."""
