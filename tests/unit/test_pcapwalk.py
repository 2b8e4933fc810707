"""The capture reader's C loops give the Python loops' answers.

``pcapwalk`` walks record headers, copies record heads and selects items
in C when ``_pcapwalk`` was built, in Python otherwise.  Both are held to
the same answers on random buffers (every byte order, the lengths' three
orders, records cut short or too long), and whole captures read with
either give the same rows.  Where the extension is expected (CI:
``NETWEAVER_REQUIRE_PCAPWALK=1``, set by tools/test.sh) its absence fails
instead of skipping.
"""

import os
import struct

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapwalk
from tests import packets as pk

C = pcapwalk._pcapwalk


def _need_c():
    if C is None:
        if os.environ.get('NETWEAVER_REQUIRE_PCAPWALK') == '1':
            pytest.fail('netweaver_agent.core._pcapwalk was not built '
                        '(a C compiler and Python headers are needed)')
        pytest.skip('netweaver_agent.core._pcapwalk not built')


def test_extension_in_use_when_built():
    _need_c()
    assert pcapwalk.compiled()


@st.composite
def record_streams(draw):
    """A pcap-like stream: a 24-byte file header, then 16-byte record
    headers with two 4-byte lengths at 8 and 12 (either order, either
    byte order), some lengths huge, the stream maybe cut anywhere."""
    big = draw(st.booleans())
    order = '>' if big else '<'
    parts = [bytes(24)]
    for _ in range(draw(st.integers(0, 60))):
        caplen = draw(st.one_of(st.integers(0, 120),
                                st.integers(0, 0x50000)))
        orig = draw(st.integers(0, 0x50000))
        data = bytes([len(parts) % 256]) * min(caplen, 200)
        parts.append(struct.pack(order + 'IIII', 1, 2, caplen, orig) + data)
    stream = b''.join(parts)
    cut = draw(st.integers(24, len(stream)))
    return stream[:cut], big


@settings(max_examples=400, deadline=None)
@given(record_streams(), st.sampled_from([8, 12]), st.booleans(),
       st.sampled_from([0x40000, 100, 0]), st.integers(0, 70),
       st.integers(0, 40))
def test_walk_pcap_c_equals_python(stream, cap_at, pair, limit, count,
                                   end_cut):
    _need_c()
    buf, big = stream
    if pair:
        cap_at = 8
    end = max(24, len(buf) - end_cut)
    args = (buf, 24, end, cap_at, big, pair, limit, count)
    assert C.walk_pcap(*args) == pcapwalk.walk_pcap_python(*args)


def test_walk_pcap_reads_each_length_field():
    """The next record is after the chosen length: at 8, at 12, or the
    smaller of the two; a walk stops at the limit, the count and the
    end."""
    hdr = struct.Struct('<IIII')
    for walk in (pcapwalk.walk_pcap, pcapwalk.walk_pcap_python):
        for lengths, at, pair, nxt in (((4, 9), 8, False, 44),
                                       ((4, 9), 12, False, 49),
                                       ((4, 9), 8, True, 44),
                                       ((9, 4), 8, True, 44),
                                       ((9, 4), 8, False, 49)):
            buf = bytes(24) + hdr.pack(0, 0, *lengths) + bytes(9)
            assert walk(buf, 24, len(buf), at, False, pair, 100, 1) == (
                [24], nxt, True), (lengths, at, pair)
        buf = bytes(24) + hdr.pack(0, 0, 4, 4) + bytes(4) + \
            hdr.pack(0, 0, 2, 2) + bytes(2)
        assert walk(buf, 24, len(buf), 8, False, False, 100, 9) == (
            [24, 44], len(buf), False)
        assert walk(buf, 24, len(buf), 8, False, False, 100, 2) == (
            [24, 44], len(buf), True)
        # A length above the limit stops the walk before that record.
        assert walk(buf, 24, len(buf), 8, False, False, 3, 9) == (
            [], 24, False)
        # As does one running past the end.
        assert walk(buf, 24, len(buf) - 1, 8, False, False, 100, 9) == (
            [24], 44, False)
        big = bytes(24) + struct.pack('>IIII', 0, 0, 4, 4) + bytes(4)
        assert walk(big, 24, len(big), 8, True, False, 100, 9) == (
            [24], 44, False)


@st.composite
def block_streams(draw):
    """pcapng-like blocks: enhanced packet blocks of a few interfaces,
    some with a wrong trailer, an odd length, a capture length too long
    for the block, or another block type; the stream maybe cut."""
    big = draw(st.booleans())
    order = '>' if big else '<'
    parts = []
    for _ in range(draw(st.integers(0, 40))):
        caplen = draw(st.integers(0, 40))
        padded = (caplen + 3) & ~3
        blen = 32 + padded + draw(st.sampled_from([0, 0, 0, 4, 8]))
        btype = draw(st.sampled_from([6, 6, 6, 6, 3, 1]))
        iface = draw(st.sampled_from([0, 0, 0, 1]))
        trail = blen
        flaw = draw(st.sampled_from([None] * 8 + ['trailer', 'odd', 'cap']))
        if flaw == 'trailer':
            trail += 4
        elif flaw == 'odd':
            blen += 2
        elif flaw == 'cap':
            caplen += 8
        body = struct.pack(order + 'IIIIII', btype, blen, iface, 0, 0,
                           caplen)
        body += bytes(blen - 28) + struct.pack(order + 'I', trail)
        parts.append(body)
    stream = b''.join(parts)
    cut = draw(st.integers(0, len(stream)))
    return stream[:cut], big


@settings(max_examples=400, deadline=None)
@given(block_streams(), st.integers(0, 50))
def test_walk_epb_c_equals_python(stream, count):
    _need_c()
    buf, big = stream
    args = (buf, 0, len(buf), big, count)
    assert C.walk_epb(*args) == pcapwalk.walk_epb_python(*args)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 320), max_size=40),
       st.integers(0, 40))
def test_heads_c_equals_python(buf, offsets, size):
    _need_c()
    assert C.heads(buf, offsets, size) == pcapwalk.heads_python(
        buf, offsets, size)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300), st.integers(0, 40),
       st.integers(0, 20), st.binary(max_size=40))
def test_select_c_equals_python(buf, start, stride, size, flags):
    _need_c()
    assert C.select(buf, start, stride, size, flags) == \
        pcapwalk.select_python(buf, start, stride, size, flags)


def test_bad_bounds_are_errors_not_reads_outside():
    _need_c()
    with pytest.raises(ValueError):
        C.walk_pcap(bytes(40), 24, 41, 8, False, False, 10, 1)
    with pytest.raises(ValueError):
        C.walk_pcap(bytes(40), 24, 40, 13, False, False, 10, 1)
    with pytest.raises(ValueError):
        C.heads(bytes(40), [-1], 4)


def _rows(read):
    if read is None:
        return None
    b = read.batch
    return (read.records, read.foreign, read.truncated,
            sorted(zip(b.keys, b.t_ns, b.direction, b.ifindex)))


@settings(max_examples=30, deadline=None)
@given(pk.randoms, st.sampled_from(['<', '>']), st.booleans(),
       st.sampled_from(['pcap', 'pcapng']))
def test_captures_read_the_same_with_either_loops(tmp_path_factory, rnd,
                                                  order, cut, fmt):
    """Hundreds of probes, replies, damaged frames and noise of mixed
    lengths (blocks the walk sorts), in probe, auto and fingerprint mode:
    the same rows with the C loops and the Python ones."""
    _need_c()
    frames = [pk.make_frame(rnd) for _ in range(rnd.randrange(150, 500))]
    frames = [f for f in frames if len(f) >= 14]
    times = [(1_763_900_000 + i) * 10 ** 9 + rnd.randrange(10 ** 9)
             for i in range(len(frames))]
    if fmt == 'pcap':
        data = pk.pcap_of(frames, times, order)
    else:
        data = pk.pcapng(frames, times, order)
    if cut:
        data = data[:rnd.randrange(24, len(data) + 1)]
    path = tmp_path_factory.mktemp('walk') / f'w.{fmt}'
    path.write_bytes(data)

    def read_all():
        out = []
        for kw in (dict(), dict(fingerprint=True, dst_ip=pk.GUEST),
                   dict(fingerprint=True, dst_ip=pk.GUEST, probes=False)):
            cap = pcapfile.read_capture(str(path), ifname='x', **kw)
            out.append((_rows(cap.probes()), _rows(cap.fingerprints())))
        return out

    with_c = read_all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcapwalk, '_pcapwalk', None)
        assert read_all() == with_c
