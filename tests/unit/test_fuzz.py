"""Hostile input: generated frames and capture files never escape the
parsers' documented errors.

* Frames (:func:`probe.parse_frame`, :func:`probe.parse_key`,
  :func:`probe.parse_packet_key`, :func:`pcapkeys.frame_key` on every link
  type): probes and replies of every protocol over IPv4 and IPv6, with VLAN
  and QinQ tags, inside VXLAN or Geneve (with options), as IP fragments,
  with IP options, then
  damaged (bytes changed at the fields that matter, lengths lied about,
  cut short, padded) or replaced by garbage.  The answer is a key or None,
  never an exception, and the fast path agrees with the reference parser
  on every one.
* Capture files (:func:`pcapfile.read_pcap`): classic pcap and pcapng with
  damaged headers, records and blocks.  The answer is a
  :class:`pcaprows.PcapRead` or a :class:`pcaprows.PcapError`, nothing
  else.

10,000 generated inputs in all, derandomized (the same ones on every
run), no deadline.
"""

import logging
import struct

import pytest
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapngreader
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from tests import packets as pk
from tests.packets import damage
from tests.packets import geneve
from tests.packets import geneve_option
from tests.packets import key_of
from tests.packets import MAC_A
from tests.packets import MAC_B
from tests.packets import make_frame
from tests.packets import randoms
from tests.packets import secret_of
from tests.packets import V4
from tests.packets import vxlan


def fuzz_settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True,
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


# --------------------------------------------------------------------------
# Damaged frames and garbage.

def _damaged(rnd):
    return damage(rnd, make_frame(rnd))


damaged_frames = randoms.map(_damaged)


garbage = st.one_of(
    st.binary(max_size=160),
    # Garbage behind a plausible Ethernet header.
    st.builds(lambda et, body: MAC_A + MAC_B + et + body,
              st.sampled_from([b'\x08\x00', b'\x86\xdd', b'\x81\x00',
                               b'\x88\xa8', b'\x08\x06']),
              st.binary(max_size=160)))


def check_frame(frame):
    found = probe.parse_frame(frame)
    assert found is None or (isinstance(found[0], probe.ProbeKey) and
                             isinstance(found[1], probe.Encap))
    assert probe.parse_key(frame) == (None if found is None else found[0])
    # The fast path gives what the reference parser gives.
    assert pcapkeys.frame_key(frame, 0, len(frame)) == key_of(frame)
    # Any link type, any cut: a key or None.
    for link in pcapkeys.LINKS.values():
        got = pcapkeys.frame_key(frame, 0, len(frame), link)
        assert got is None or len(got) in (2, 3)
        if got is not None:
            auth = pcapkeys.frame_auth(
                frame, 0, len(frame), link,
                got[2].tunnel if len(got) > 2 else None)
            assert auth is None or 0 <= auth < 1 << 64
        pcapkeys.fingerprint_key(frame, 0, len(frame), link, V4[1])
    probe.parse_packet_key(frame[14:])
    probe.ip6_key(frame, 14)


# --------------------------------------------------------------------------
# Frames: 6,000 inputs.

@fuzz_settings(3500)
@given(damaged_frames)
def test_fuzz_damaged_frames(frame):
    check_frame(frame)


@fuzz_settings(1500)
@given(garbage)
def test_fuzz_garbage_frames(frame):
    check_frame(frame)


def make_tunnel_frame(rnd):
    """An untagged IPv4 probe or reply inside VXLAN or Geneve (random
    options) over IPv4: what the columnar tunnel path reads."""
    proto = rnd.choice(probe.PROTOCOLS)
    seq = rnd.randrange(0x10000 if proto == 'tcp' else 1 << 32)
    if proto == 'tcp' and hasattr(probe, 'tcp_ident'):
        seq = probe.tcp_ident(rnd.randrange(1, 0x10000), seq)
    frame = probe.build_frame(proto, rnd.randrange(0x10000), seq, *V4,
                              MAC_A, MAC_B, size=rnd.randrange(20, 141),
                              secret=secret_of(rnd))
    if rnd.random() < 0.5:
        frame = pk.reply(frame, rnd.choice(['rst', 'synack']))
    if rnd.random() < 0.5:
        return vxlan(frame, rnd.randrange(1 << 24),
                     port=rnd.choice(probe.VXLAN_PORTS))
    options = b''.join(
        geneve_option(rnd.randrange(0x10000), rnd.randrange(256),
                      rnd.randbytes(4 * rnd.randrange(4)))
        for _ in range(rnd.randrange(4)))
    return geneve(frame, rnd.randrange(1 << 24), options=options)


@fuzz_settings(1000)
@given(randoms)
def test_fuzz_runs_agree_with_one_by_one(rnd):
    """Columnar keys of equal-length damaged frames: no exception, and
    every record they decide is what frame_key says."""
    check_run(rnd, make_frame(rnd))


@fuzz_settings(500)
@given(randoms)
def test_fuzz_tunnel_runs_agree_with_one_by_one(rnd):
    """The same for runs of VXLAN/Geneve frames (columnar tunnel path),
    some with another VNI."""
    base = make_tunnel_frame(rnd)
    if rnd.random() < 0.3:
        other = bytearray(base)
        other[46:49] = rnd.randbytes(3)                 # the VNI
        base = [base, bytes(other)]
    check_run(rnd, base)


def check_run(rnd, base):
    bases = base if isinstance(base, list) else [base]
    frames = [damage(rnd, b) if rnd.random() < 0.3 else b
              for b in (rnd.choice(bases)
                        for _ in range(rnd.randrange(16, 41)))]
    size = max(len(f) for f in frames) + rnd.randrange(4)
    frames = [f + bytes(size - len(f)) for f in frames]
    buf = b''.join(frames)
    for link in pcapkeys.LINKS.values():
        found = pcapkeys.run_keys(buf, 0, size, len(frames), size, link)
        if found is None:
            continue
        for i, ok in enumerate(found.ok):
            if ok:
                want = (found.sessions[i], found.keys[i])
                if found.encaps is not None:
                    want += (found.encaps[i],)
                assert pcapkeys.frame_key(buf, i * size, size, link) == \
                    want, i
                # ... and the auth (tag and address) frame_auth reads.
                assert found.auth[i] == pcapkeys.frame_auth(
                    buf, i * size, size, link,
                    found.encaps[i].tunnel if found.encaps else None), i


# --------------------------------------------------------------------------
# Capture files: 4,000 inputs.

@pytest.fixture(scope='module')
def pcap_path(tmp_path_factory):
    # Thousands of damaged files: their warnings (cut short, unknown link
    # type) are expected; keep them out of the log capture.
    logger = logging.getLogger('netweaver_agent.core.pcapfile')
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield str(tmp_path_factory.mktemp('fuzz') / 'fuzz.pcap')
    logger.setLevel(level)


def pcap_bytes(frames, order, nano, linktype, snaplen):
    return pk.pcap([(1_763_900_000 + i, i * 1000, frame)
                    for i, frame in enumerate(frames)], order, nano,
                   linktype=linktype, snaplen=snaplen)


def pcapng_bytes(frames, order, tsresol, linktype):
    def block(btype, body):
        return pk.block(order, btype, body + bytes(-len(body) % 4))

    def option(code, value):
        return pk.option(order, code, value)

    shb = pk.shb(order)
    idb = block(pcapngreader.PCAPNG_IDB,
                struct.pack(order + 'HHI', linktype, 0, 65535) +
                option(2, b'eth1') + option(9, bytes([tsresol])) +
                option(0, b''))
    out = [shb, idb]
    for i, frame in enumerate(frames):
        ts = 1_763_900_000_000_000 + i
        kind = i % 7
        if kind == 5:
            out.append(block(pcapngreader.PCAPNG_SPB,
                             struct.pack(order + 'I', len(frame)) + frame))
        elif kind == 6:
            out.append(block(pcapngreader.PCAPNG_OPB, struct.pack(
                order + 'HHIIII', 0, 0, ts >> 32, ts & 0xffffffff,
                len(frame), len(frame)) + frame + bytes(-len(frame) % 4)))
        else:
            flags = option(2, struct.pack(order + 'I', 1 + i % 2)) + \
                option(0, b'') if kind < 3 else b''
            out.append(block(pcapngreader.PCAPNG_EPB, struct.pack(
                order + 'IIIII', 0, ts >> 32, ts & 0xffffffff, len(frame),
                len(frame)) + frame + bytes(-len(frame) % 4) + flags))
    return b''.join(out)


def make_capture_file(rnd):
    """A capture file of probes, then damaged where it hurts."""
    base = make_frame(rnd)
    frames = [damage(rnd, make_frame(rnd)) if rnd.random() < 0.3 else base
              for _ in range(rnd.randrange(41))]
    order = rnd.choice('<>')
    linktype = rnd.choice([1, 1, 1, 113, 276, 147])
    if rnd.random() < 0.5:
        data = bytearray(pcap_bytes(frames, order, rnd.random() < 0.5,
                                    linktype,
                                    rnd.choice([65535, 262144, 64, 0])))
        hot = [0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 32, 33, 34, 35]
    else:
        data = bytearray(pcapng_bytes(frames, order,
                                      rnd.choice([6, 9, 0x89, 0x8a, 200]),
                                      linktype))
        hot = [0, 4, 5, 8, 9, 10, 11, 28, 29, 32, 33, 36, 44, 48, 52, 56,
               60, 64, 68, 72, 76, 80, 84, 88, 92]
    # Damage: header fields, block/record lengths, random bytes, a cut.
    for _ in range(rnd.randrange(5)):
        at = rnd.choice(hot) if rnd.random() < 0.5 else \
            rnd.randrange(max(1, len(data)))
        if at < len(data):
            data[at] = rnd.choice([0, 0xff, 0x0a, 1, 6, 0x80]) \
                if rnd.random() < 0.5 else rnd.randrange(256)
    if rnd.random() < 0.25:
        data = data[:rnd.randrange(len(data) + 1)]
    if rnd.random() < 0.15:
        data += rnd.randbytes(rnd.randrange(1, 41))
    return bytes(data)


capture_files = randoms.map(make_capture_file)


def check_file(path, data, **kwargs):
    with open(path, 'wb') as f:
        f.write(data)
    try:
        read = pcapfile.read_pcap(path, **kwargs)
    except pcaprows.PcapError as exc:
        assert path in str(exc)
        return
    batch = read.batch
    assert isinstance(batch, sightings.SightingBatch)
    n = len(batch)
    assert (len(batch.keys), len(batch.ifindex), len(batch.direction)) == \
        (n, n, n)
    assert set(batch.ifindex) <= set(batch.ifnames)
    assert read.records >= read.probes + read.other_sessions
    for key, index in batch.encap:
        assert index in batch.ifnames


@fuzz_settings(3000)
@given(capture_files)
def test_fuzz_capture_files(pcap_path, data):
    check_file(pcap_path, data)


@fuzz_settings(500)
@given(capture_files)
def test_fuzz_capture_files_fingerprint(pcap_path, data):
    check_file(pcap_path, data, fingerprint=True, dst_ip='198.18.0.10')


@fuzz_settings(500)
@given(st.binary(max_size=300))
def test_fuzz_garbage_files(pcap_path, data):
    # Some garbage starting like a pcap or pcapng file, some not.
    for head in (b'', b'\xd4\xc3\xb2\xa1', b'\x0a\x0d\x0d\x0a'):
        check_file(pcap_path, head + data)
