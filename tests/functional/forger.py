"""A hostile guest: forges another guest's probes and answers.

Run inside a lab guest's namespace (``ip netns exec``) with a JSON spec
(``python -m tests.functional.forger SPEC``).  It reads the window's
session, identity and tag from its *own* probe (a packet socket on its
``eth0``), then, until ``duration_s`` or ``max_frames``, writes to its
``eth0`` look-alikes of the victim's probes for every sequence number up
to ``seq_max`` (to the victim's MAC, from the probe source's address)
and of the victim's answers (from the victim's address, to the source's
MAC, so the bridge sends them out of the pif).  Each look-alike carries
the tag of the guest's own probe, the best a guest can do.  Frames leave
with the guest's own MAC (the bridge keeps forwarding the victim's
traffic to the victim) and addresses in 198.18.0.0/15 only.  Prints one
JSON line: whether it saw a probe, the session, how many frames it sent
and when (CLOCK_REALTIME ns).
"""

import json
import socket
import struct
import sys
import time

import dpkt

from netweaver_agent.core import probe

ETH_P_ALL = 0x0003


def mac(text):
    return bytes.fromhex(text.replace(':', ''))


def own_probe(sock, spec, deadline):
    """``(session, payload)`` of the first probe to this guest, or None."""
    own = socket.inet_aton(spec['own_ip'])
    while time.monotonic() < deadline:
        try:
            frame = sock.recv(2048)
        except socket.timeout:
            continue
        eth = dpkt.ethernet.Ethernet(frame)
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP) or ip.dst != own:
            continue
        l4 = ip.data
        if isinstance(l4, dpkt.icmp.ICMP) and l4.type == 8:
            payload = bytes(l4.data.data)
        elif isinstance(l4, dpkt.udp.UDP):
            payload = bytes(l4.data)
        else:
            continue
        if payload[:4] == probe.MAGIC:
            return struct.unpack('!H', payload[4:6])[0], payload
    return None


def _ip(src, dst, proto, l4):
    ip = dpkt.ip.IP(src=src, dst=dst, p=proto, ttl=64, data=l4)
    ip.len = len(ip)
    return bytes(ip)


def look_alikes(spec, session, payload, seq):
    """The forged probe and answer frames for ``seq``."""
    src, victim = (socket.inet_aton(spec['src_ip']),
                   socket.inet_aton(spec['victim_ip']))
    body = (struct.pack('!4sHI', probe.MAGIC, session, seq) +
            payload[probe.TAG_LEN:])
    if spec['protocol'] == 'icmp':
        req = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(
            id=session, seq=seq & 0xffff, data=body))
        fwd = _ip(src, victim, dpkt.ip.IP_PROTO_ICMP, req)
        rep = dpkt.icmp.ICMP(type=0, data=dpkt.icmp.ICMP.Echo(
            id=session, seq=seq & 0xffff, data=body))
        back = _ip(victim, src, dpkt.ip.IP_PROTO_ICMP, rep)
    else:
        udp = dpkt.udp.UDP(sport=probe.udp_source_port(session),
                           dport=probe.DEFAULT_UDP_PORT, data=body)
        udp.ulen = len(udp)
        fwd = _ip(src, victim, dpkt.ip.IP_PROTO_UDP, udp)
        err = dpkt.icmp.ICMP(type=3, code=3, data=dpkt.icmp.ICMP.Unreach(
            data=dpkt.ip.IP(fwd)))
        back = _ip(victim, src, dpkt.ip.IP_PROTO_ICMP, err)
    own = mac(spec['own_mac'])
    return [mac(spec['victim_mac']) + own + b'\x08\x00' + fwd,
            mac(spec['src_mac']) + own + b'\x08\x00' + back]


def main(argv):
    with open(argv[1], encoding='utf-8') as f:
        spec = json.load(f)
    out = {'sniffed': False, 'session': None, 'sent': 0, 'first_ns': None,
           'last_ns': None}
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                         socket.htons(ETH_P_ALL))
    try:
        sock.bind((spec['iface'], 0))
        sock.settimeout(0.05)
        print(json.dumps({'state': 'running'}), flush=True)
        deadline = time.monotonic() + spec['duration_s']
        found = own_probe(sock, spec, deadline)
        if found is not None:
            session, payload = found
            out.update(sniffed=True, session=session)
            frames = [f for seq in range(spec['seq_max'])
                      for f in look_alikes(spec, session, payload, seq)]
            out['first_ns'] = time.time_ns()
            while (time.monotonic() < deadline and
                   out['sent'] < spec['max_frames']):
                for frame in frames:
                    sock.send(frame)
                out['sent'] += len(frames)
                out['last_ns'] = time.time_ns()
                time.sleep(spec.get('pause_s', 0.002))
    finally:
        sock.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))
