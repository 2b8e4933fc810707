"""The C extension ``_probebuild`` gives the Python code's bytes.

* its BLAKE2b is :func:`hashlib.blake2b` for keys of 0..64 bytes, digests
  of 1..64, messages across block boundaries;
* ``tags`` are :func:`probe._mac`'s, one per sequence number;
* ``build_v4`` (through :class:`probe.V4Builder`) gives
  :func:`probe.build_ip`'s packets byte for byte: ICMP and UDP, any
  sequence number, address, size, port, with and without a secret, and
  the checksums whose sum is zero (a UDP checksum of 0 goes as 0xffff);
* :meth:`probe.Tagger.expected_many` and the verifying
  :class:`latency.Matcher` (one batch of auths per vNIC, when its first
  sighting needs one) answer alike with the extension and with the Python
  loops (``probe._probebuild`` None);
* bad arguments raise naming what is wrong.

Where the extension is expected (CI: ``NETWEAVER_REQUIRE_PCAPWALK=1``,
set by tools/test.sh) its absence fails instead of skipping.
"""

import contextlib
import hashlib
import socket

import dpkt
from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from tests.unit import cext

C = probe._probebuild
SESSION = 0x5151
SECRET = bytes(range(32))
SRC = socket.inet_aton('198.18.0.1')
DST = socket.inet_aton('198.18.0.10')

_ADDR = st.integers(0, 2**32 - 1).map(lambda v: v.to_bytes(4, 'big'))
_SEQ = st.one_of(st.sampled_from([0, 1, 0xffff, 0x10000, 0xffffffff]),
                 st.integers(0, 0xffffffff))
_SECRET = st.one_of(st.none(), st.binary(min_size=16, max_size=64))


@contextlib.contextmanager
def python_loops():
    """probe.py without the extension, for the block."""
    saved = probe._probebuild
    probe._probebuild = None
    try:
        yield
    finally:
        probe._probebuild = saved


def build_both(proto, session, seqs, src, dst, **kw):
    """``V4Builder.build`` with the extension and with Python's loop."""
    builder = probe.V4Builder(proto, session, **kw)
    fast = builder.build(seqs, src, dst)
    with python_loops():
        slow = builder.build(seqs, src, dst)
    return fast, slow


def reference(proto, session, seqs, src, dst, **kw):
    return [probe.build_ip(proto, session, s, src, dst, **kw) for s in seqs]


# --------------------------------------------------------------------------
# BLAKE2b

@pytest.mark.parametrize('keylen', [0, 1, 16, 63, 64])
def test_blake2b_equals_hashlib_across_block_boundaries(keylen):
    cext.need(C, '_probebuild')
    key = bytes(range(7, 7 + keylen))
    for n in range(0, 301):
        msg = bytes((i * 31 + n) & 0xff for i in range(n))
        for size in (1, 8, 32, 64):
            assert C._blake2b(msg, key, size) == hashlib.blake2b(
                msg, key=key, digest_size=size).digest(), (n, size)


@given(msg=st.binary(max_size=600), key=st.binary(max_size=64),
       size=st.integers(1, 64))
def test_blake2b_equals_hashlib(msg, key, size):
    cext.need(C, '_probebuild')
    assert C._blake2b(msg, key, size) == hashlib.blake2b(
        msg, key=key, digest_size=size).digest()


@given(key=st.binary(max_size=64), proto=st.sampled_from(probe.PROTOCOLS),
       session=st.integers(0, 0xffff),
       seqs=st.lists(st.one_of(_SEQ, st.integers(0, 2**64 - 1)),
                     max_size=8),
       dst=st.one_of(_ADDR, st.binary(min_size=16, max_size=16)),
       size=st.integers(1, 64))
def test_tags_are_probe_macs(key, proto, session, seqs, dst, size):
    cext.need(C, '_probebuild')
    want = b''.join(probe._mac(key, proto, session, s, dst, size)
                    for s in seqs)
    assert C.tags(key, probe._PROTO_CODE[proto], session, seqs, dst,
                  size) == want


# --------------------------------------------------------------------------
# IPv4 probes

@given(seqs=st.lists(_SEQ, min_size=1, max_size=10),
       session=st.integers(0, 0xffff),
       proto=st.sampled_from(['icmp', 'udp']),
       size=st.integers(64, 1500), ttl=st.integers(1, 255),
       port=st.one_of(st.none(), st.integers(1, 0xffff)),
       secret=_SECRET, src=_ADDR, dst=_ADDR)
def test_build_v4_gives_build_ips_bytes(seqs, session, proto, size, ttl,
                                        port, secret, src, dst):
    cext.need(C, '_probebuild')
    kw = dict(size=size, ttl=ttl, port=port, secret=secret)
    want = reference(proto, session, seqs, src, dst, **kw)
    fast, slow = build_both(proto, session, seqs, src, dst, **kw)
    assert fast == want
    assert slow == want
    assert all(type(p) is bytes for p in fast)


def test_every_seq_edge_in_one_call():
    cext.need(C, '_probebuild')
    seqs = [0, 1, 0xfffe, 0xffff, 0x10000, 0x1ffff, 0xfffffffe, 0xffffffff]
    for proto in ('icmp', 'udp'):
        for secret in (None, SECRET):
            want = reference(proto, SESSION, seqs, SRC, DST, secret=secret)
            assert build_both(proto, SESSION, seqs, SRC, DST,
                              secret=secret) == (want, want)


def _residue(checksum):
    """The word sum (modulo 0xffff) that an Internet checksum stands
    for (RFC 1071: the checksum is its one's complement)."""
    return ~checksum & 0xffff


def _udp_sum(packet):
    return dpkt.ip.IP(packet).data.sum


def test_udp_checksum_zero_goes_as_ffff():
    """A destination port chosen so that the UDP words sum to zero: the
    packet carries 0xffff (RFC 768), from both loops."""
    cext.need(C, '_probebuild')
    for secret in (None, SECRET):
        first = probe.build_ip('udp', SESSION, 77, SRC, DST, port=1,
                               secret=secret)
        # Moving the port by d moves the sum by d.
        port = (1 - _residue(_udp_sum(first))) % 0xffff or 0xffff
        want = probe.build_ip('udp', SESSION, 77, SRC, DST, port=port,
                              secret=secret)
        assert _udp_sum(want) == 0xffff
        assert build_both('udp', SESSION, [77], SRC, DST, port=port,
                          secret=secret) == ([want], [want])


def test_ip_and_icmp_checksums_of_a_zero_sum_are_zero():
    """Addresses and a sequence number chosen so that the words sum to
    zero: the checksum is 0 (a non-zero total folds to 0xffff)."""
    cext.need(C, '_probebuild')
    first = probe.build_ip('icmp', SESSION, 5, SRC, DST)
    # The IP header: moving the destination's low word by d moves it by d.
    ip_sum = dpkt.ip.IP(first).sum
    low = (int.from_bytes(DST[2:], 'big') - _residue(ip_sum)) % 0xffff
    dst = DST[:2] + low.to_bytes(2, 'big')
    packet = probe.build_ip('icmp', SESSION, 5, SRC, dst)
    assert dpkt.ip.IP(packet).sum == 0
    assert build_both('icmp', SESSION, [5], SRC, dst) == ([packet], [packet])
    # ICMP (no secret: a zero tag): the sequence number's high word moves
    # only the tag's copy of it.
    icmp_sum = dpkt.ip.IP(first).data.sum
    seq = ((-_residue(icmp_sum)) % 0xffff) << 16 | 5
    packet = probe.build_ip('icmp', SESSION, seq, SRC, DST)
    assert dpkt.ip.IP(packet).data.sum == 0
    assert build_both('icmp', SESSION, [seq], SRC, DST) == (
        [packet], [packet])


def test_one_builder_many_destinations_and_iterables():
    cext.need(C, '_probebuild')
    builder = probe.V4Builder('udp', SESSION, size=200, port=4000,
                              secret=SECRET)
    for last in (2, 10, 254):
        dst = socket.inet_aton(f'198.18.3.{last}')
        assert builder.build(iter(range(3)), SRC, dst) == reference(
            'udp', SESSION, range(3), SRC, dst, size=200, port=4000,
            secret=SECRET)
    assert builder.build([], SRC, DST) == []


# --------------------------------------------------------------------------
# Expected auths and the matcher

@given(secret=_SECRET, proto=st.sampled_from(['icmp', 'udp']),
       seqs=st.lists(_SEQ, max_size=8),
       dst=st.one_of(_ADDR, st.binary(min_size=16, max_size=16)))
def test_expected_many_is_expected_auth_of_each(secret, proto, seqs, dst):
    tagger = probe.Tagger(secret, proto, SESSION)
    want = [probe.expected_auth(secret, proto, SESSION, s, dst)
            for s in seqs]
    assert tagger.expected_many(seqs, dst) == want
    with python_loops():
        assert tagger.expected_many(seqs, dst) == want


PATHS = [vifpath.VifPath('tap0', None, ('eth1', 'tap0')),
         vifpath.VifPath('tap1', None, ('eth1', 'tap1'))]
ADDRESSES = {'tap0': '198.18.0.10', 'tap1': '198.18.0.11'}
PLAN = {n: ('tap0', 'tap1')[n % 2] for n in range(1, 21)}


def sighted(proto, seqs, forged=()):
    """A batch: each probe of ``seqs`` received on the pif and sent out
    of its tap, with the auth read from the packet; ``forged`` probes
    carry another window's tag."""
    batch = sightings.SightingBatch(SESSION)
    for seq in list(seqs) + list(forged):
        vif = PLAN[seq]
        dst = socket.inet_aton(ADDRESSES[vif])
        packet = probe.build_ip(proto, SESSION, seq, SRC, dst,
                                secret=bytes(32) if seq in forged
                                else SECRET)
        auth = probe.packet_auth(packet)
        for ifname, t, direction in (('eth1', 1000 * seq, sightings.DIR_IN),
                                     (vif, 1000 * seq + 40,
                                      sightings.DIR_OUT)):
            batch.append(seq << 1, batch.interface_index(ifname), t,
                         direction, auth)
    return batch


def matcher(proto):
    return latency.Matcher(SESSION, PATHS, PLAN, 10**9, protocol=proto,
                           secret=SECRET, addresses=ADDRESSES)


@pytest.mark.parametrize('proto', ['icmp', 'udp'])
def test_matcher_computes_a_vnics_auths_once_when_first_needed(proto):
    m = matcher(proto)
    tap0 = [s for s, v in PLAN.items() if v == 'tap0']
    m.feed_batch(sighted(proto, tap0[:3]))
    # tap0's probes, all of them, once; none of tap1's (never sighted).
    assert m.verifications == len(tap0)
    m.feed_batch(sighted(proto, tap0[3:5]))
    assert m.verifications == len(tap0)
    tap1 = [s for s, v in PLAN.items() if v == 'tap1']
    m.feed_batch(sighted(proto, [tap1[0]], forged=[tap1[1]]))
    assert m.verifications == len(PLAN)
    reps = m.reports()
    assert reps['tap0'].ingress.count == 5
    assert reps['tap1'].ingress.count == 1
    assert reps['tap1'].rejected == 2         # the forged probe's two rows


@pytest.mark.parametrize('proto', ['icmp', 'udp'])
def test_matcher_reports_alike_with_and_without_the_extension(proto):
    cext.need(C, '_probebuild')
    seqs = [s for s in PLAN if s % 3]
    forged = [s for s in PLAN if not s % 3]
    fast = matcher(proto)
    fast.feed_batch(sighted(proto, seqs, forged))
    with python_loops():
        slow = matcher(proto)
        slow.feed_batch(sighted(proto, seqs, forged))
    assert fast.reports() == slow.reports()
    assert fast.verifications == slow.verifications == len(PLAN)
    assert sum(r.rejected for r in fast.reports().values()) == \
        2 * len(forged)


# --------------------------------------------------------------------------
# Bad arguments

def _template():
    return probe.V4Builder('icmp', SESSION)._fixed


def _build(**over):
    args = dict(template=_template(), src=SRC, dst=DST, seqs=[1], icmp=True,
                ip_base=0, l4_base=0, key=SECRET, code=1, session=SESSION)
    args.update(over)
    return C.build_v4(*args.values())


@pytest.mark.parametrize('over, error, match', [
    (dict(seqs=[2**32]), ValueError, r'seqs\[0\]'),
    (dict(seqs=[1, -1]), ValueError, r'seqs\[1\]'),
    (dict(seqs=[1, 2**70]), ValueError, r'seqs\[1\]'),
    (dict(seqs=[1.0]), TypeError, r'seqs\[0\].*int'),
    (dict(seqs=5), TypeError, 'seqs'),
    (dict(src=bytes(16)), ValueError, 'IPv4'),
    (dict(dst=b'abc'), ValueError, 'IPv4'),
    (dict(dst='198.18.0.1'), TypeError, 'dst'),
    (dict(template=bytes(45)), ValueError, 'template'),
    (dict(ip_base=0xffff), ValueError, 'modulo 0xffff'),
    (dict(l4_base=2**20), ValueError, 'modulo 0xffff'),
    (dict(key=bytes(65)), ValueError, 'key'),
    (dict(key='secret'), TypeError, 'key'),
    (dict(code=256), ValueError, 'code'),
    (dict(session=0x10000), ValueError, 'session'),
])
def test_build_v4_refuses_bad_arguments(over, error, match):
    cext.need(C, '_probebuild')
    _build()
    with pytest.raises(error, match=match):
        _build(**over)


@pytest.mark.parametrize('args, error, match', [
    ((bytes(65), 1, 1, [1], DST, 8), ValueError, 'key'),
    ((SECRET, 1, 1, [1], DST, 0), ValueError, 'digest_size'),
    ((SECRET, 1, 1, [1], DST, 65), ValueError, 'digest_size'),
    ((SECRET, 1, 1, [2**64], DST, 8), ValueError, r'seqs\[0\]'),
    ((SECRET, 1, 1, ['1'], DST, 8), TypeError, r'seqs\[0\]'),
    ((SECRET, 1, 1, [1], bytes(65), 8), ValueError, 'dst'),
    ((SECRET, -1, 1, [1], DST, 8), ValueError, 'code'),
    ((SECRET, 1, -1, [1], DST, 8), ValueError, 'session'),
    ((None, 1, 1, [1], DST, 8), TypeError, 'key'),
])
def test_tags_refuse_bad_arguments(args, error, match):
    cext.need(C, '_probebuild')
    with pytest.raises(error, match=match):
        C.tags(*args)
    with pytest.raises(ValueError, match='digest_size'):
        C._blake2b(b'', b'', 0)
