"""The OVN lab's pause/resume delayer: its OpenFlow messages."""

import struct

import pytest

from netweaver_agent.lab import ovndelay


def prop(ptype, data):
    body = struct.pack('!HH', ptype, 4 + len(data)) + data
    return body + b'\0' * (-len(body) % 8)


def test_setup_asks_for_packet_ins_of_its_own_id_with_continuations():
    msgs = ovndelay.setup_messages(4321)
    kinds = [struct.unpack_from('!BBHI', m) for m in msgs]
    assert all(length == len(m) for (_, _, length, _), m in zip(kinds, msgs))
    nx = {struct.unpack_from('!II', m, 8)[1]: m[16:] for m in msgs
          if m[1] == ovndelay.OFPT_EXPERIMENTER}
    assert nx[ovndelay.NXT_SET_CONTROLLER_ID][-2:] == struct.pack(
        '!H', 4321)
    assert struct.unpack('!I', nx[ovndelay.NXT_SET_PACKET_IN_FORMAT]) \
        == (ovndelay.NXPIF_NXT_PACKET_IN2,)
    config = [m for m in msgs if m[1] == ovndelay.OFPT_SET_CONFIG]
    assert struct.unpack_from('!H', config[0], 10)[0] > 0, \
        'a service connection gets packet-ins only with a miss length'
    # The barrier comes last: its reply says the rest is applied.
    assert msgs[-1][1] == ovndelay.OFPT_BARRIER_REQUEST
    for bad in (0, 0x10000):
        with pytest.raises(ValueError, match=str(bad)):
            ovndelay.setup_messages(bad)


def test_packet_found_among_properties():
    frame = bytes(range(60))
    props = prop(2, b'\0' * 5) + prop(ovndelay.NXPINT_PACKET, frame) + \
        prop(7, b'x' * 13)
    assert ovndelay.packet_of(props) == frame
    with pytest.raises(ValueError, match='no packet'):
        ovndelay.packet_of(prop(2, b'\0' * 4))
    with pytest.raises(ValueError, match='overruns'):
        ovndelay.packet_of(struct.pack('!HH', 0, 200) + frame)
