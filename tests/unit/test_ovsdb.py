"""The read-only OVSDB client: notation, snapshots, bounded JSON-RPC.

The outputs below are verbatim ``ovs-vsctl --format=json --data=json
--columns=… list TABLE`` of Open vSwitch 3.1 (a br-int with a hybrid
``qvo`` port and a patch to br-ex, br-tun with a VXLAN port).  The
JSON-RPC tests talk to a small server thread on a unix socket (the real
ovsdb-server is in tests/functional/test_ovs_topology.py).
"""

import json
import os
import socket
import tempfile
import threading

import pytest

from netweaver_agent.agent import ovsdb

VSCTL = {
    'Open_vSwitch': (
        '{"data":[[["uuid","8204344d-f7c1-4d3e-a0aa-b8ce5b93adea"],["set",['
        '["uuid","3a192da6-7f58-46cf-bee9-9189b9e7d234"],["uuid","7853eecd-'
        '6d49-40cd-bf00-871d59a389fa"],["uuid","c6d23a70-c09a-47c7-8bf9-47b'
        '4880dfee4"]]],["map",[["ovn-encap-ip","198.18.0.1"]]]]],"headings"'
        ':["_uuid","bridges","external_ids"]}'),
    'Bridge': (
        '{"data":[[["uuid","c6d23a70-c09a-47c7-8bf9-47b4880dfee4"],"br-tun"'
        ',["set",[["uuid","12f20121-5bc6-4cfd-93a3-6b537e9f72bf"],["uuid","'
        '643d3932-e1ab-4eca-9821-956c19e045a0"]]],""],[["uuid","7853eecd-6d'
        '49-40cd-bf00-871d59a389fa"],"br-ex",["set",[["uuid","084ca52f-a227'
        '-4875-b6de-be094bf640b7"],["uuid","0d2b2c94-9cf5-448c-b902-b60687b'
        'af810"],["uuid","5509e9c0-72b1-4bd6-82d2-ae7d618c1787"]]],""],[["u'
        'uid","3a192da6-7f58-46cf-bee9-9189b9e7d234"],"br-int",["set",[["uu'
        'id","3ed30ac4-8064-4a91-921b-c766105b04af"],["uuid","7e8b753c-9d41'
        '-4de6-a248-b68da35cf277"],["uuid","bdac8b92-b607-4052-ac66-297a4c9'
        '18cf6"]]],"netdev"]],"headings":["_uuid","name","ports","datapath_'
        'type"]}'),
    'Port': (
        '{"data":[[["uuid","5509e9c0-72b1-4bd6-82d2-ae7d618c1787"],"br-ex",'
        '["uuid","338933c6-4d3c-4a3a-aca3-03f02c2ecfe1"],["set",[]],["map",'
        '[]]],[["uuid","12f20121-5bc6-4cfd-93a3-6b537e9f72bf"],"br-tun",["u'
        'uid","7a27d46b-b9f4-48e0-93b9-423b694e05a2"],["set",[]],["map",[]]'
        '],[["uuid","bdac8b92-b607-4052-ac66-297a4c918cf6"],"br-int",["uuid'
        '","1703cc23-49f0-4898-9205-20d1700a23fb"],["set",[]],["map",[]]],['
        '["uuid","643d3932-e1ab-4eca-9821-956c19e045a0"],"vxlan-c6120002",['
        '"uuid","65771890-e81a-4475-84ce-2c695a9b583f"],["set",[]],["map",['
        ']]],[["uuid","0d2b2c94-9cf5-448c-b902-b60687baf810"],"phy-br-int",'
        '["uuid","7e180dec-431c-449d-b6de-f6ebf70a3700"],["set",[]],["map",'
        '[]]],[["uuid","3ed30ac4-8064-4a91-921b-c766105b04af"],"qvo1234",["'
        'uuid","087dff1a-dd70-43d8-84ce-af3b23361cd0"],1,["map",[["net_uuid'
        '","n1"],["network_type","vlan"],["physical_network","physnet1"],["'
        'segmentation_id","101"]]]],[["uuid","7e8b753c-9d41-4de6-a248-b68da'
        '35cf277"],"int-br-ex",["uuid","23f0410f-5885-4dd3-b76a-9175c287211'
        'd"],["set",[]],["map",[]]],[["uuid","084ca52f-a227-4875-b6de-be094'
        'bf640b7"],"eth1",["uuid","b4e2fc95-3b2a-4eac-90de-2bface42c2a9"],['
        '"set",[]],["map",[]]]],"headings":["_uuid","name","interfaces","ta'
        'g","other_config"]}'),
    'Interface': (
        '{"data":[[["uuid","65771890-e81a-4475-84ce-2c695a9b583f"],"vxlan-c'
        '6120002","vxlan",["map",[["in_key","flow"],["local_ip","198.18.0.1'
        '"],["out_key","flow"],["remote_ip","198.18.0.2"]]],["map",[]]],[["'
        'uuid","087dff1a-dd70-43d8-84ce-af3b23361cd0"],"qvo1234","",["map",'
        '[]],["map",[["attached-mac","fa:16:3e:00:00:01"],["iface-id","1234'
        '-aaa"],["vm-uuid","vm1"]]]],[["uuid","1703cc23-49f0-4898-9205-20d1'
        '700a23fb"],"br-int","internal",["map",[]],["map",[]]],[["uuid","7a'
        '27d46b-b9f4-48e0-93b9-423b694e05a2"],"br-tun","internal",["map",[]'
        '],["map",[]]],[["uuid","7e180dec-431c-449d-b6de-f6ebf70a3700"],"ph'
        'y-br-int","patch",["map",[["peer","int-br-ex"]]],["map",[]]],[["uu'
        'id","b4e2fc95-3b2a-4eac-90de-2bface42c2a9"],"eth1","",["map",[]],['
        '"map",[]]],[["uuid","338933c6-4d3c-4a3a-aca3-03f02c2ecfe1"],"br-ex'
        '","internal",["map",[]],["map",[]]],[["uuid","23f0410f-5885-4dd3-b'
        '76a-9175c287211d"],"int-br-ex","patch",["map",[["peer","phy-br-int'
        '"]]],["map",[]]]],"headings":["_uuid","name","type","options","ext'
        'ernal_ids"]}'),
}


def vsctl_rows():
    """``{table: [row dict]}`` of :data:`VSCTL`, as a select returns."""
    out = {}
    for table, text in VSCTL.items():
        doc = json.loads(text)
        out[table] = [dict(zip(doc['headings'], row)) for row in doc['data']]
    return out


# --- notation and snapshot ---------------------------------------------------

def test_notation_sets_maps_and_optionals():
    assert ovsdb.as_set(['set', [['uuid', 'a'], ['uuid', 'b']]]) == \
        ('a', 'b')
    assert ovsdb.as_set(['uuid', 'a']) == ('a',)
    assert ovsdb.as_set(['set', []]) == ()
    assert dict(ovsdb.as_map(['map', [['peer', 'x'], ['k', 1]]])) == \
        {'peer': 'x', 'k': '1'}
    assert dict(ovsdb.as_map(['set', []])) == {}
    assert ovsdb.as_optional(['set', []]) is None
    assert ovsdb.as_optional(7) == 7
    assert ovsdb.as_optional(['set', [7]]) == 7


def test_snapshot_from_vsctl_output():
    snap = ovsdb.snapshot_from_vsctl(VSCTL)
    assert sorted(b.name for b in snap.bridges) == [
        'br-ex', 'br-int', 'br-tun']
    assert snap.external_ids['ovn-encap-ip'] == '198.18.0.1'
    qvo = snap.interface('qvo1234')
    assert (qvo.iface_id, qvo.attached_mac) == (
        '1234-aaa', 'fa:16:3e:00:00:01')
    assert snap.bridge_of('qvo1234').name == 'br-int'
    assert snap.bridge_of('qvo1234').datapath_type == 'netdev'
    assert snap.port_of('qvo1234').tag == 1
    assert snap.port_of('qvo1234').network_type == 'vlan'
    assert snap.port_of('eth1').tag is None
    assert snap.interface('int-br-ex').peer == 'phy-br-int'
    assert snap.interface('eth1').peer is None
    vxlan = snap.interface('vxlan-c6120002')
    assert vxlan.is_tunnel
    assert (vxlan.local_ip, vxlan.remote_ip) == ('198.18.0.1', '198.18.0.2')
    assert vxlan.dst_port == 4789          # IANA's, options has none
    assert snap.bridge_of('vxlan-c6120002').name == 'br-tun'
    names = [(p.name, [i.name for i in ifaces])
             for p, ifaces in snap.members(snap.bridge('br-ex'))]
    assert names == [('br-ex', ['br-ex']), ('eth1', ['eth1']),
                     ('phy-br-int', ['phy-br-int'])]
    assert snap.interface('nope') is None and snap.bridge_of('nope') is None


def test_same_snapshot_from_rows_and_from_vsctl():
    by_rows = ovsdb.snapshot_from_rows(vsctl_rows())
    by_text = ovsdb.snapshot_from_vsctl(VSCTL)
    assert by_rows.interfaces == by_text.interfaces
    assert by_rows.ports == by_text.ports
    assert by_rows.bridges == by_text.bridges


@pytest.mark.parametrize('kind, options, port', [
    ('geneve', {}, 6081),
    ('vxlan', {'dst_port': '8472'}, 8472),
    ('geneve', {'dst_port': '99999'}, None),
    ('geneve', {'dst_port': 'x'}, None),
    ('gre', {}, None),
])
def test_tunnel_dst_port(kind, options, port):
    iface = ovsdb.OvsInterface(uuid='u', name='t', type=kind,
                               options=options)
    assert iface.dst_port == port
    assert iface.is_tunnel


def test_interface_off_any_bridge_is_not_on_the_switch():
    rows = vsctl_rows()
    rows['Interface'].append({'_uuid': ['uuid', 'lonely'], 'name': 'tapx',
                              'type': '', 'options': ['map', []],
                              'external_ids': ['map', []]})
    snap = ovsdb.snapshot_from_rows(rows)
    assert snap.interface('tapx') is None


def test_unreadable_vsctl_output_names_the_table():
    with pytest.raises(ovsdb.OvsdbError, match='list Port'):
        ovsdb.snapshot_from_vsctl({'Port': 'ovs-vsctl: unix:/x: no such'})


def test_vsctl_argv_is_a_list_reading_our_columns():
    argv = ovsdb.vsctl_argv('Interface', db='unix:/run/x.sock')
    assert argv[0] == 'ovs-vsctl' and '--db=unix:/run/x.sock' in argv
    assert argv[-2:] == ['list', 'Interface']
    cols = next(a for a in argv if a.startswith('--columns='))
    assert {'name', 'type', 'options', 'external_ids'} <= set(
        cols.split('=', 1)[1].split(','))


@pytest.mark.parametrize('text, family, address', [
    ('unix:/run/openvswitch/db.sock', socket.AF_UNIX,
     '/run/openvswitch/db.sock'),
    ('tcp:127.0.0.1:6640', socket.AF_INET, ('127.0.0.1', 6640)),
    ('tcp:[::1]:6640', socket.AF_INET6, ('::1', 6640)),
])
def test_parse_connection(text, family, address):
    assert ovsdb.parse_connection(text) == (family, address)


@pytest.mark.parametrize('text', ['', 'unix:', 'tcp:127.0.0.1',
                                  'tcp:h:0', 'tcp:h:70000', 'ssl:h:1',
                                  '/run/db.sock'])
def test_bad_connection_is_named(text):
    with pytest.raises(ValueError, match='OVSDB connection'):
        ovsdb.parse_connection(text)


# --- the JSON-RPC exchange, against a server thread --------------------------

class FakeServer:
    """Accepts one connection on a unix socket; ``reply(request)`` gives
    the byte chunks to send back (None: send nothing, keep it open)."""

    def __init__(self, reply):
        self.dir = tempfile.mkdtemp(prefix='nw-ovsdb-')
        self.path = os.path.join(self.dir, 'db.sock')
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.reply = reply
        self.requests = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def connection(self):
        return f'unix:{self.path}'

    def _read_one(self, conn):
        buf = b''
        decoder = json.JSONDecoder()
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
            try:
                return decoder.raw_decode(buf.decode())[0]
            except ValueError:
                continue

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            request = self._read_one(conn)
            self.requests.append(request)
            chunks = self.reply(request)
            try:
                for chunk in chunks or ():
                    conn.sendall(chunk)
                    if chunk.startswith(b'{"method":"echo"'):
                        self.requests.append(self._read_one(conn))
            except (BrokenPipeError, ConnectionResetError):
                pass    # the client hung up: what a refusal does
            self.done.wait(10)

    def close(self):
        self.done.set()
        self.thread.join(5)
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def server():
    made = []

    def make(reply):
        made.append(FakeServer(reply))
        return made[-1]
    yield make
    for srv in made:
        srv.close()


def select_reply(request, rows=None):
    rows = rows or vsctl_rows()
    tables = [op['table'] for op in request['params'][1:]]
    return {'id': request['id'], 'error': None,
            'result': [{'rows': rows.get(t, [])} for t in tables]}


def test_snapshot_over_json_rpc_in_small_chunks_after_an_echo(server):
    def reply(request):
        body = json.dumps(select_reply(request)).encode()
        # The server's keepalive first, then the reply cut into 7-byte
        # pieces (a UTF-8 boundary included).
        echo = b'{"method":"echo","params":["x"],"id":"echo"}'
        return [echo] + [body[i:i + 7] for i in range(0, len(body), 7)]
    srv = server(reply)
    snap = ovsdb.read_snapshot(srv.connection, timeout_s=5)
    assert snap.bridge_of('qvo1234').name == 'br-int'
    assert snap.source == srv.connection
    request, echo_reply = srv.requests
    assert request['method'] == 'transact'
    assert request['params'][0] == 'Open_vSwitch'
    assert {op['op'] for op in request['params'][1:]} == {'select'}
    assert [op['table'] for op in request['params'][1:]] == list(
        ovsdb.COLUMNS)
    assert echo_reply == {'result': ['x'], 'id': 'echo'}


def test_reply_with_split_multibyte_character(server):
    def reply(request):
        rows = vsctl_rows()
        rows['Bridge'][0]['name'] = 'br-é'
        body = json.dumps(select_reply(request, rows),
                          ensure_ascii=False).encode()
        cut = body.index('é'.encode()) + 1
        return [body[:cut], body[cut:]]
    snap = ovsdb.read_snapshot(server(reply).connection, timeout_s=5)
    assert 'br-é' in {b.name for b in snap.bridges}


def test_oversized_reply_is_refused(server):
    def reply(request):
        return [b'{"id":1,"result":[' + b' ' * 4096] * 10
    srv = server(reply)
    with pytest.raises(ovsdb.OvsdbError) as err:
        ovsdb.read_snapshot(srv.connection, timeout_s=5, max_bytes=10000)
    assert srv.connection in str(err.value)
    assert 'exceeds 10000 bytes' in str(err.value)


def test_silent_server_times_out(server):
    srv = server(lambda request: None)
    with pytest.raises(ovsdb.OvsdbError, match='no complete reply within'):
        ovsdb.read_snapshot(srv.connection, timeout_s=0.3)


def test_closed_connection_is_named(server):
    srv = server(lambda request: [b'{"id":1,"res'])
    srv.done.set()
    with pytest.raises(ovsdb.OvsdbError) as err:
        ovsdb.read_snapshot(srv.connection, timeout_s=5)
    assert srv.connection in str(err.value)
    assert 'connection closed' in str(err.value)


def test_transact_error_is_named(server):
    def reply(request):
        return [json.dumps({'id': request['id'], 'result': [
            {'error': 'unknown table', 'details': 'Bridge'}] * 4,
            'error': None}).encode()]
    with pytest.raises(ovsdb.OvsdbError, match='select on Open_vSwitch'):
        ovsdb.read_snapshot(server(reply).connection, timeout_s=5)


def test_not_json_rpc_is_refused(server):
    srv = server(lambda request: [b'[1, 2, 3]'])
    with pytest.raises(ovsdb.OvsdbError, match='not a JSON-RPC message'):
        ovsdb.read_snapshot(srv.connection, timeout_s=5)


def test_missing_socket_is_named(tmp_path):
    path = f'unix:{tmp_path}/none.sock'
    with pytest.raises(ovsdb.OvsdbError) as err:
        ovsdb.read_snapshot(path, timeout_s=1)
    assert path in str(err.value) and 'cannot connect' in str(err.value)
