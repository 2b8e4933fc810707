"""The packed sender's C pacing loop keeps :func:`pacing.pace`'s rules.

Against real sockets on loopback (UDP receivers, one port a
destination), with the real clock, so only what the loop guarantees
whatever the machine's load is asserted:

* every packet leaves once, whole, in order, to its destination's
  socket and address, unless the deadline stops it (then counted left);
* a packet's batch is done no earlier than its offset less the quantum
  after the call, and no closer to its destination's previous batch than
  their offsets are apart; never two packets to one destination in a
  batch;
* the gate is called before each batch with the largest packet and the
  count, and an exception from it stops the loop;
* a failed send is counted and kept (index, errno) and the others go;
* bad arguments raise naming what is wrong.

:class:`sendloop.PackedPackets` gives back the packets it packed, and
:class:`sources.LocalSource` uses the C loop for its own sockets, Python's
:func:`pacing.pace` when a subclass writes packets its own way.
Where the extension is expected (CI: ``NETWEAVER_REQUIRE_PCAPWALK=1``,
set by tools/test.sh) its absence fails instead of skipping.
"""

import array
import socket
import time

from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import privileged
from netweaver_agent.core import pacing
from netweaver_agent.core import sendloop
from netweaver_agent.core import sources
from tests.unit import cext

C = sendloop._sendloop
QUANTUM_NS = 2_000_000


def _need_c():
    cext.need(C, '_sendloop')


@pytest.fixture
def receivers():
    """Three UDP sockets on 127.0.0.1 (one destination each) and the
    sending socket."""
    rx = []
    for _ in range(3):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(('127.0.0.1', 0))
        s.setblocking(False)
        rx.append(s)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield tx, rx
    tx.close()
    for s in rx:
        s.close()


def _addr(sock):
    """The packed sockaddr_in of a bound UDP socket."""
    host, port = sock.getsockname()
    return sendloop._SOCKADDR_IN.pack(
        socket.AF_INET, socket.htons(port), socket.inet_aton(host))


def _packed(items):
    """``(offset_ns, destination index, data)`` as the loop's arrays."""
    dst_index = array.array('I', [d for _, d, _ in items])
    offsets = array.array('q', [o for o, _, _ in items])
    bounds = array.array('q', [0])
    for _, _, data in items:
        bounds.append(bounds[-1] + len(data))
    return dst_index, offsets, bounds, b''.join(d for _, _, d in items)


def _run(tx, rx, items, deadline_s=30.0, gate=None, max_errors=5,
         addrs=None):
    dst_index, offsets, bounds, data = _packed(items)
    times = array.array('q', [-1]) * len(items)
    before = time.monotonic_ns()
    got = C.send_paced(
        tuple(tx.fileno() for _ in rx),
        addrs or tuple(_addr(s) for s in rx), dst_index, offsets, bounds,
        data, before + int(deadline_s * 1e9), QUANTUM_NS, gate, max_errors,
        times)
    return got, before, times


def _received(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def _schedule(n, per_dst_step_ns, spread_ns=0):
    """``n`` packets round-robin over three destinations, each
    destination's spaced ``per_dst_step_ns``."""
    return [(i // 3 * per_dst_step_ns + (i % 3) * spread_ns, i % 3,
             b'packet %d ' % i * (1 + i % 4)) for i in range(n)]


def _check_rules(items, times, before):
    """What the loop guarantees whatever the load: see the module doc."""
    last = {}
    for i, (offset, dst, _) in enumerate(items):
        assert times[i] >= before + offset - QUANTUM_NS, i
        if dst in last:
            prev_i = last[dst]
            # A later batch, and spaced as the plan.
            assert times[i] - times[prev_i] >= offset - items[prev_i][0], i
            assert times[i] > times[prev_i], i
        last[dst] = i


def test_every_packet_leaves_once_whole_in_order_within_the_rules(
        receivers):
    _need_c()
    tx, rx = receivers
    items = _schedule(60, 3_000_000, spread_ns=100_000)
    (sent, failed, errors, left), before, times = _run(tx, rx, items)
    assert (sent, failed, errors, left) == (60, 0, [], 0)
    for d, sock in enumerate(rx):
        assert _received(sock) == [data for _, dst, data in items
                                   if dst == d]
    _check_rules(items, times, before)


def test_packets_due_together_leave_in_one_batch_one_per_destination(
        receivers):
    _need_c()
    tx, rx = receivers
    # Three destinations due at once, twice, 20 ms apart.
    items = [(0, 0, b'a'), (0, 1, b'bb'), (0, 2, b'c'),
             (20_000_000, 0, b'd'), (20_000_000, 1, b'e'),
             (20_000_000, 2, b'ffff')]
    calls = []
    (sent, failed, errors, left), before, times = _run(
        tx, rx, items, gate=lambda largest, n: calls.append((largest, n)))
    assert (sent, left) == (6, 0)
    assert calls == [(2, 3), (4, 3)]
    assert len(set(times[:3])) == 1 and len(set(times[3:])) == 1
    _check_rules(items, times, before)


def test_a_second_packet_to_one_destination_waits_for_the_next_batch(
        receivers):
    _need_c()
    tx, rx = receivers
    items = [(0, 0, b'a'), (0, 1, b'b'), (500_000, 0, b'c')]
    calls = []
    (sent, _, _, left), before, times = _run(
        tx, rx, items, gate=lambda largest, n: calls.append(n))
    assert sent == 3 and calls == [2, 1]
    _check_rules(items, times, before)


def test_a_late_batch_pushes_its_destinations_next_packet_back(receivers):
    _need_c()
    tx, rx = receivers
    # The first batch is held 30 ms (a gate at the daemon's limits):
    # destination 0's next packet, planned 5 ms after, leaves 5 ms after
    # that batch, not at once although it is overdue.
    items = [(0, 0, b'a'), (0, 1, b'b'), (5_000_000, 0, b'c')]
    held = []

    def gate(largest, n):
        if not held:
            held.append(n)
            time.sleep(0.03)
    (sent, _, _, _), before, times = _run(tx, rx, items, gate=gate)
    assert sent == 3
    assert times[2] - times[0] >= 5_000_000
    _check_rules(items, times, before)


def test_the_deadline_leaves_later_packets_unsent_and_counted(receivers):
    _need_c()
    tx, rx = receivers
    items = [(0, 0, b'a'), (0, 1, b'b'), (60 * 10**9, 2, b'late')]
    (sent, failed, errors, left), _, times = _run(tx, rx, items,
                                                  deadline_s=0.5)
    assert (sent, failed, left) == (2, 0, 1)
    assert times[2] == -1 and _received(rx[2]) == []


def test_a_failed_send_is_kept_and_the_others_go(receivers):
    _need_c()
    tx, rx = receivers
    # An IPv6 address on an IPv4 socket: sendto refuses it.
    bad = sendloop.sockaddr('2001:2::1')
    addrs = (_addr(rx[0]), bad, _addr(rx[2]))
    items = _schedule(9, 1_000_000)
    (sent, failed, errors, left), before, times = _run(
        tx, rx, items, max_errors=2, addrs=addrs)
    assert (sent, failed, left) == (6, 3, 0)
    assert [i for i, _ in errors] == [1, 4]
    assert all(err > 0 for _, err in errors)
    assert len(_received(rx[0])) == 3 and len(_received(rx[2])) == 3
    _check_rules(items, times, before)


def test_the_gates_exception_stops_the_loop(receivers):
    _need_c()
    tx, rx = receivers
    items = _schedule(9, 1_000_000)
    calls = []

    def gate(largest, n):
        calls.append(n)
        if len(calls) == 2:
            raise RuntimeError('over the limit')
    with pytest.raises(RuntimeError, match='over the limit'):
        _run(tx, rx, items, gate=gate)
    assert sum(len(_received(s)) for s in rx) == calls[0]


@pytest.mark.parametrize('change, message', [
    (lambda a: a.update(offsets=a['offsets'][:-1]), 'offsets'),
    (lambda a: a.update(bounds=array.array('q', [0, 1, 0, 2])),
     'ends before'),
    (lambda a: a.update(bounds=array.array('q', [0, 1, 2, 99])),
     'outside data'),
    (lambda a: a.update(dst_index=array.array('I', [0, 5, 1])),
     'packet 1: destination 5'),
    (lambda a: a.update(addrs=a['addrs'][:1]), 'addresses'),
    (lambda a: a.update(dst_index=array.array('H', [0, 1, 1])), 'uint32'),
])
def test_bad_arguments_say_what_is_wrong(receivers, change, message):
    _need_c()
    tx, rx = receivers
    dst_index, offsets, bounds, data = _packed(
        [(0, 0, b'a'), (0, 1, b'b'), (0, 1, b'c')])
    args = dict(fds=(tx.fileno(), tx.fileno()),
                addrs=(_addr(rx[0]), _addr(rx[1])), dst_index=dst_index,
                offsets=offsets, bounds=bounds, data=data)
    change(args)
    with pytest.raises(ValueError, match=message):
        C.send_paced(args['fds'], args['addrs'], args['dst_index'],
                     args['offsets'], args['bounds'], args['data'],
                     time.monotonic_ns() + 10**9, QUANTUM_NS, None, 5, None)
    assert _received(rx[0]) == [] and _received(rx[1]) == []


@given(st.lists(st.tuples(st.integers(0, 10**9),
                          st.sampled_from(['198.18.0.1', '198.18.0.2',
                                           '2001:2::5']),
                          st.binary(max_size=40)), max_size=30))
def test_packed_packets_give_back_what_was_packed(items):
    packed = sendloop.PackedPackets.pack(items)
    assert len(packed) == len(items)
    assert packed.packets() == [pacing.Packet(o, d, data)
                                for o, d, data in items]
    assert sorted(packed.dsts) == sorted(set(d for _, d, _ in items))


def test_sockaddrs_are_the_kernels():
    v4 = sendloop.sockaddr('198.18.0.7')
    assert socket.AF_INET.to_bytes(2, 'little') == v4[:2]
    assert v4[4:8] == socket.inet_aton('198.18.0.7') and len(v4) == 16
    v6 = sendloop.sockaddr('2001:2::7')
    assert v6[8:24] == socket.inet_pton(socket.AF_INET6, '2001:2::7')
    assert len(v6) == 28


class _Recorder(sources.LocalSource):
    """A LocalSource writing its probes its own way (as the lab's do)."""

    def __init__(self):
        super().__init__(netns_name='recorder')
        self.written = []

    def _transmit(self, sock, dst, data):
        self.written.append(dst)


def test_local_source_uses_the_c_loop_for_its_own_sockets(monkeypatch):
    _need_c()
    used = []
    monkeypatch.setattr(sendloop, 'send',
                        lambda *a, **k: used.append(a) or pacing.Paced(
                            1, 0, (), 0))
    src = sources.LocalSource(netns_name='recorder')
    plan = _plan()
    monkeypatch.setattr(src, '_make_ready', lambda plan: _payload())
    monkeypatch.setattr(src, '_socket_for', lambda dst: None)
    assert src.send(plan, time.monotonic() + 5).sent == 1
    assert len(used) == 1


def test_a_source_writing_its_own_way_paces_in_python(monkeypatch):
    def no_c(*a, **k):
        raise AssertionError('the C loop cannot call _transmit')
    monkeypatch.setattr(sendloop, 'send', no_c)
    src = _Recorder()
    monkeypatch.setattr(src, '_make_ready', lambda plan: _payload())
    monkeypatch.setattr(src, '_socket_for', lambda dst: None)
    result = src.send(_plan(), time.monotonic() + 5)
    assert result.sent == 2 and src.written == ['198.18.0.1', '198.18.0.2']


def _plan():
    return sources.ProbePlan(session=1, protocol='icmp', probes=(
        sources.PlannedProbe(1, '198.18.0.1', 0),
        sources.PlannedProbe(2, '198.18.0.2', 0)), size=64)


def _payload():
    return sendloop.PackedPackets.pack([(0, '198.18.0.1', b'x'),
                                        (0, '198.18.0.2', b'y')])


def test_a_packet_due_after_the_quantum_waits_for_its_time(receivers):
    _need_c()
    tx, rx = receivers
    items = [(0, 0, b'a'), (QUANTUM_NS + 1_000_000, 1, b'b')]
    calls = []
    (sent, _, _, _), before, times = _run(
        tx, rx, items, gate=lambda largest, n: calls.append(n))
    assert sent == 2 and calls == [1, 1]
    _check_rules(items, times, before)


def _refused_payload():
    """Two packets in one batch to loopback, port 0: the kernel refuses
    each send, nothing leaves."""
    return sendloop.PackedPackets.pack([(0, '127.0.0.1', b'x' * 70),
                                        (0, '127.0.0.2', b'y' * 90)])


def _daemon_send(monkeypatch, pacer):
    monkeypatch.setattr(privileged, '_pacer', pacer)
    src = privileged._DaemonSource(netns_name='recorder')
    monkeypatch.setattr(src, '_make_ready', lambda plan: _refused_payload())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        monkeypatch.setattr(src, '_socket_for', lambda dst: udp)
        return src.send(_plan(), time.monotonic() + 5)


def test_the_daemon_source_limits_the_c_loops_batches_in_c(monkeypatch):
    _need_c()
    # 1,000 probes/s: a batch of two takes two 1 ms slots and leaves at
    # the second; nothing is called in Python.
    pacer = privileged._Pacer(daemonlimits.DaemonLimits(probes_per_s=1000),
                              burst_s=0.0)
    monkeypatch.setattr(pacer, 'wait', lambda *a: pytest.fail('Python'))
    before = time.monotonic_ns()
    result = _daemon_send(monkeypatch, pacer)
    assert (result.sent, result.failed) == (0, 2)
    assert result.errors[0].startswith('127.0.0.1: [Errno ')
    assert time.monotonic_ns() - before >= 1_000_000
    assert pacer.gate().state[0] >= before + 2_000_000


def test_the_daemon_source_gates_in_python_without_the_c_limiter(
        monkeypatch):
    _need_c()
    waits = []
    pacer = privileged._Pacer(compiled=False)
    monkeypatch.setattr(pacer, 'wait',
                        lambda nbytes, n=1: waits.append((nbytes, n)))
    result = _daemon_send(monkeypatch, pacer)
    assert (result.sent, result.failed) == (0, 2)
    assert waits == [(90, 2)]


@pytest.mark.parametrize('burst_ms', [0, 5])
def test_the_c_limiter_keeps_the_rate_after_its_burst(burst_ms):
    _need_c()
    limits = daemonlimits.DaemonLimits(probes_per_s=1000)
    pacer = privileged._Pacer(limits, burst_s=burst_ms / 1000)
    assert pacer.compiled
    start = time.monotonic_ns()
    for _ in range(20):
        pacer.wait(64)
    # A burst of burst_ms passes without sleeping; then 1 ms apart.
    assert time.monotonic_ns() - start >= (20 - burst_ms - 1) * 1_000_000
    assert pacer.gate().state[0] >= start - burst_ms * 1_000_000 + 20_000_000


def test_the_c_limiter_spaces_by_bytes_and_shares_its_state():
    _need_c()
    # 64,000 bytes/s: a 640-byte probe takes a 10 ms slot (not the
    # probe rate's 10 us), and both the C loop and wait() take from one
    # state.
    limiter = sendloop.Limiter(array.array('q', [0]), 100_000, 64_000, 0)
    start = time.monotonic_ns()
    sendloop.limit_wait(limiter, 640, 2)
    mid = limiter.state[0]
    assert mid >= start + 20_000_000
    sendloop.limit_wait(limiter, 640, 1)
    assert limiter.state[0] == mid + 10_000_000
    assert time.monotonic_ns() - start >= 20_000_000


@pytest.mark.parametrize('limiter, error', [
    ((array.array('q', [0]), 0, 1, 0), ValueError),
    ((array.array('q', [0]), 1, 1, -1), ValueError),
    ((array.array('i', [0]), 1, 1, 0), ValueError),
    ((b'12345678', 1, 1, 0), BufferError),
    ((array.array('q', [0]), 1, 1), TypeError),
])
def test_a_bad_limiter_is_refused(limiter, error):
    _need_c()
    with pytest.raises(error):
        C.limit_wait(limiter, 64, 1)
