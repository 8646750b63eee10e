"""Healthy traffic with the tool attached, and how often each of the tool's BPF programs ran
meanwhile: the healthy-path VM test (tests/guest/trace_run.py runs :func:`healthy_phase`
before any scenario, so no other namespace sends anything) and ``make bench`` (which runs
this module on every kernel of the matrix) both count with it.

Runs inside the VM.  Two labs: one whose traffic is ESP (IPv4 and IPv6, host-to-host policies and
SAs with no mark), one without any IPsec.  Each kind of traffic sends a fixed amount;
the kernel counts every run of ``xt_entry`` (argument recording) and ``xt_site`` (counter
sites) while ``kernel.bpf_stats_enabled`` is 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from vmlab.guest import ipsec, probestats
from vmlab.guest.ipsec import Lab, LabConfig
from vmlab.guest.nsutil import entered
from vmlab.guest.tool import SITE_MODULES, Tool, loaded_modules

ESP_LAB = LabConfig(ns_a="xt-ha", ns_b="xt-hb", veth_a="xt-hva", veth_b="xt-hvb",
                    addr_a="10.79.0.1", addr_b="10.79.0.2", ipv6=True,
                    addr6_a="fd00:79::1", addr6_b="fd00:79::2", mark=0, mask=0)
PLAIN_LAB = LabConfig(ns_a="xt-pa", ns_b="xt-pb", veth_a="xt-pva", veth_b="xt-pvb",
                      addr_a="10.80.0.1", addr_b="10.80.0.2", mark=0, mask=0)
TCP_BYTES = 2 << 20
UDP_DATAGRAMS = 500
PINGS = 100
PORT = 5201

#: Output route lookups each kind of traffic makes, at most.  On connected sockets the
#: route (and its IPsec bundle) is looked up per connection: TCP's connect, the listener's
#: SYN-ACK and its child socket (IPv6: one more; 8 runs measured on every kernel); UDP's
#: connect.  ``ping`` sends on an unconnected socket and the echo reply is routed too: two
#: per ping, and one more in the first exchange (402 runs measured for 100 pings).
ROUTE_LOOKUPS = {"esp-tcp": 3, "esp6-tcp": 4, "esp-udp": 1, "esp-ping": 2 * PINGS + 1,
                 "plain-tcp": 3, "plain-udp": 1, "plain-ping": 2 * PINGS + 1}
#: Argument probes a lookup that finds an IPsec policy may run (README "Healthy path").
LOOKUP_PROBES = 2
#: Fewest veth packets each kind can have moved (both directions).  A plain TCP skb may
#: carry up to 64 KiB (GSO/GRO over veth), so 2 MiB can be as few as 32 data packets (85
#: were seen); ESP's are MTU-sized.  UDP and ping send one packet each.
MIN_PACKETS = {"esp-tcp": PINGS, "esp6-tcp": PINGS, "esp-udp": UDP_DATAGRAMS,
               "esp-ping": PINGS, "plain-tcp": TCP_BYTES // (64 << 10),
               "plain-udp": UDP_DATAGRAMS, "plain-ping": PINGS}


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _drain(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 16):
            pass


def tcp_stream(cfg: LabConfig, src: str, dst: str) -> None:
    """TCP_BYTES from ns_a to ns_b over one connection."""
    family = _family(dst)
    with entered(cfg.ns_b):
        server = socket.socket(family, socket.SOCK_STREAM)
    with entered(cfg.ns_a):
        client = socket.socket(family, socket.SOCK_STREAM)
    with server, client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((dst, PORT))
        server.listen(1)
        client.bind((src, 0))
        client.connect((dst, PORT))
        conn, _peer = server.accept()
        reader = threading.Thread(target=_drain, args=(conn,))
        reader.start()
        chunk = bytes(1 << 16)
        for _ in range(TCP_BYTES // len(chunk)):
            client.sendall(chunk)
        client.shutdown(socket.SHUT_WR)
        reader.join(timeout=60)


def udp_datagrams(cfg: LabConfig, src: str, dst: str) -> None:
    """UDP_DATAGRAMS from a connected socket in ns_a to ns_b."""
    with entered(cfg.ns_b):
        receiver = socket.socket(_family(dst), socket.SOCK_DGRAM)
    with entered(cfg.ns_a):
        sender = socket.socket(_family(dst), socket.SOCK_DGRAM)
    with receiver, sender:
        receiver.bind((dst, PORT))
        sender.bind((src, 0))
        sender.connect((dst, PORT))
        for _ in range(UDP_DATAGRAMS):
            sender.send(bytes(1000))
            receiver.recv(2048)


def pings(cfg: LabConfig, _src: str, dst: str) -> None:
    ipsec.run(ipsec.in_ns(cfg.ns_a, "ping", "-q", "-c", str(PINGS), "-i", "0.01", "-W", "2",
                          dst))


def _kinds(esp: LabConfig, plain: LabConfig) -> Dict[str, tuple[Callable, LabConfig, str, str]]:
    return {
        "esp-tcp": (tcp_stream, esp, esp.addr_a, esp.addr_b),
        "esp6-tcp": (tcp_stream, esp, esp.addr6_a, esp.addr6_b),
        "esp-udp": (udp_datagrams, esp, esp.addr_a, esp.addr_b),
        "esp-ping": (pings, esp, esp.addr_a, esp.addr_b),
        "plain-tcp": (tcp_stream, plain, plain.addr_a, plain.addr_b),
        "plain-udp": (udp_datagrams, plain, plain.addr_a, plain.addr_b),
        "plain-ping": (pings, plain, plain.addr_a, plain.addr_b),
    }


def healthy_phase(tool: Tool) -> Dict[str, Any]:
    """Every kind of healthy traffic, with the program runs and packets it caused."""
    esp, plain = Lab(ESP_LAB), Lab(PLAIN_LAB)
    before_modules = set(loaded_modules())
    record: Dict[str, Any] = {"kinds": {}}
    try:
        esp.setup()
        plain.create_network()
        # The SAs loaded esp4/esp6: their sites must be attached before anything is counted.
        for module in SITE_MODULES:
            if module in loaded_modules() and module not in before_modules:
                record.setdefault("attach_seconds", {})[module] = tool.wait_for_status(
                    f"Module {module} loaded")
        stat0 = {ns: ipsec.xfrm_stat(ns) for ns in (esp.cfg.ns_a, esp.cfg.ns_b)}
        probestats.enable_bpf_stats(True)
        for kind, (send, cfg, src, dst) in _kinds(esp.cfg, plain.cfg).items():
            progs0, packets0 = probestats.bpf_prog_stats(), probestats.veth_tx_packets(cfg)
            send(cfg, src, dst)
            progs1, packets1 = probestats.bpf_prog_stats(), probestats.veth_tx_packets(cfg)
            record["kinds"][kind] = {"packets": packets1 - packets0,
                                     **probestats.program_runs(progs0, progs1)}
        record["xfrm_stat_delta"] = {ns: ipsec.counter_delta(stat0[ns], ipsec.xfrm_stat(ns))
                                     for ns in stat0}
        # The ESP lab's traffic really was ESP (a policy that did not match would let it
        # through in the clear): packets counted by the receiver's SAs.
        record["esp_sa_packets"] = probestats.xfrm_state_packets(
            ipsec.run(["ip", "-n", esp.cfg.ns_b, "-s", "xfrm", "state"]).stdout)
    except (OSError, ipsec.LabError) as err:
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        probestats.enable_bpf_stats(False)
        esp.teardown()
        plain.teardown()
    return record



def main(argv: Optional[List[str]] = None) -> int:
    """``python -m vmlab.guest.healthy --out DIR``: start the tool, run the healthy phase,
    write ``DIR/healthy.json``."""
    parser = argparse.ArgumentParser(prog="python -m vmlab.guest.healthy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tool = Tool(args.out, [])
    try:
        record: Dict[str, Any] = (healthy_phase(tool) if tool.wait_ready()
                                  else {"error": "the tool never got ready"})
    finally:
        record_rc = tool.stop()
    record["returncode"] = record_rc
    record["kernel"] = Path("/proc/sys/kernel/osrelease").read_text().strip()
    (args.out / "healthy.json").write_text(json.dumps(record, indent=1))
    return 0 if "error" not in record else 1


if __name__ == "__main__":
    raise SystemExit(main())
