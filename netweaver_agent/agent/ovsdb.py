"""A read-only view of Open vSwitch's database, for finding vNIC paths.

One :class:`OvsSnapshot` per polling cycle: a single RFC 7047 JSON-RPC
``transact`` of four ``select`` operations (``Open_vSwitch``, ``Bridge``,
``Port``, ``Interface``) over ``unix:PATH`` or ``tcp:HOST:PORT`` (what
Neutron's OVS agent listens on, ``tcp:127.0.0.1:6640``).  Nothing is ever
written.  The exchange is bounded in time (connect and read) and in the
bytes read, so a broken or hostile peer can neither hang a cycle nor
exhaust memory; every error names the connection.

The same snapshot is built from ``ovs-vsctl --format=json list TABLE``
output (:func:`snapshot_from_vsctl`), which ``netweaver measure`` runs on
a remote hypervisor over SSH: both speak OVSDB's JSON notation
(``["uuid", …]``, ``["set", […]]``, ``["map", [[k, v], …]]``).
"""

import dataclasses
import json
import socket
import time
import types

from oslo_log import log

from netweaver_agent.core import netns

LOG = log.getLogger(__name__)

DATABASE = 'Open_vSwitch'
DEFAULT_TIMEOUT_S = 5.0
# A compute host with thousands of ports answers in well under 1 MiB.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_CHUNK = 65536

# Columns read, per table (``_uuid`` is how rows refer to each other).
COLUMNS = {
    'Open_vSwitch': ('_uuid', 'bridges', 'external_ids'),
    'Bridge': ('_uuid', 'name', 'ports', 'datapath_type'),
    'Port': ('_uuid', 'name', 'interfaces', 'tag', 'other_config'),
    'Interface': ('_uuid', 'name', 'type', 'options', 'external_ids'),
}
# Interface types that encapsulate in UDP, with their IANA ports.
UDP_TUNNELS = {'vxlan': 4789, 'geneve': 6081}
TUNNEL_TYPES = frozenset(('vxlan', 'geneve', 'gre', 'ip6gre', 'stt',
                          'lisp', 'erspan', 'ip6erspan', 'gtpu', 'srv6',
                          'bareudp'))

_EMPTY = types.MappingProxyType({})


def _map_field():
    return dataclasses.field(default_factory=lambda: _EMPTY)


class OvsdbError(Exception):
    """OVSDB could not be read; the message names the connection."""


class OvsdbAbsent(OvsdbError):
    """The unix socket does not exist: no Open vSwitch on this host."""


# --- OVSDB JSON notation (RFC 7047 5.1) -----------------------------------

def _atom(value):
    if isinstance(value, list) and len(value) == 2 and \
            value[0] in ('uuid', 'named-uuid'):
        return value[1]
    return value


def as_set(value):
    """A column value as a tuple of atoms (a bare atom is a 1-set)."""
    if isinstance(value, list) and len(value) == 2 and value[0] == 'set':
        return tuple(_atom(v) for v in value[1])
    if value is None:
        return ()
    return (_atom(value),)


def as_map(value):
    """A ``["map", [[k, v], …]]`` column as a read-only dict."""
    if isinstance(value, list) and len(value) == 2 and value[0] == 'map':
        return types.MappingProxyType(
            {str(_atom(k)): str(_atom(v)) for k, v in value[1]})
    return _EMPTY


def as_optional(value):
    """An optional scalar column (a 0- or 1-set) as the atom or None."""
    atoms = as_set(value)
    return atoms[0] if len(atoms) == 1 else None


# --- what a snapshot holds --------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class OvsInterface:
    """A row of the ``Interface`` table."""

    uuid: str
    name: str
    type: str = ''
    options: types.MappingProxyType = _map_field()
    external_ids: types.MappingProxyType = _map_field()

    @property
    def is_tunnel(self):
        return self.type in TUNNEL_TYPES

    @property
    def peer(self):
        """The other end of a patch port, or None."""
        return self.options.get('peer') if self.type == 'patch' else None

    @property
    def remote_ip(self):
        return self.options.get('remote_ip')

    @property
    def local_ip(self):
        return self.options.get('local_ip')

    @property
    def dst_port(self):
        """UDP destination port of a VXLAN/Geneve tunnel, or None."""
        if self.type not in UDP_TUNNELS:
            return None
        raw = self.options.get('dst_port')
        if raw is None:
            return UDP_TUNNELS[self.type]
        try:
            port = int(raw)
        except ValueError:
            return None
        return port if 0 < port < 65536 else None

    @property
    def iface_id(self):
        return self.external_ids.get('iface-id')

    @property
    def attached_mac(self):
        return self.external_ids.get('attached-mac')


@dataclasses.dataclass(frozen=True, slots=True)
class OvsPort:
    """A row of the ``Port`` table (``interfaces`` are uuids)."""

    uuid: str
    name: str
    interfaces: tuple = ()
    tag: int | None = None
    other_config: types.MappingProxyType = _map_field()

    @property
    def network_type(self):
        """What Neutron's OVS agent recorded (``vxlan``, ``vlan``, …)."""
        return self.other_config.get('network_type')


@dataclasses.dataclass(frozen=True, slots=True)
class OvsBridge:
    """A row of the ``Bridge`` table (``ports`` are uuids)."""

    uuid: str
    name: str
    ports: tuple = ()
    datapath_type: str = ''


@dataclasses.dataclass(frozen=True, slots=True)
class OvsSnapshot:
    """The switch's bridges, ports and interfaces at one moment.

    ``external_ids`` are the ``Open_vSwitch`` row's (OVN keeps
    ``ovn-encap-ip`` and ``ovn-encap-type`` there).  Lookups by name are
    indexed once, when the snapshot is made.
    """

    bridges: tuple = ()
    ports: tuple = ()
    interfaces: tuple = ()
    external_ids: types.MappingProxyType = _map_field()
    source: str = ''
    _index: dict = dataclasses.field(default=None, init=False, repr=False,
                                     compare=False)

    def __post_init__(self):
        iface_by_uuid = {i.uuid: i for i in self.interfaces}
        port_by_uuid = {p.uuid: p for p in self.ports}
        index = {'iface': {}, 'port_of_iface': {}, 'bridge_of_port': {},
                 'bridge': {}, 'ifaces_of_port': {}}
        for port in self.ports:
            members = tuple(iface_by_uuid[u] for u in port.interfaces
                            if u in iface_by_uuid)
            index['ifaces_of_port'][port.uuid] = members
            for iface in members:
                index['port_of_iface'][iface.name] = port
        for bridge in self.bridges:
            index['bridge'][bridge.name] = bridge
            for uuid in bridge.ports:
                if uuid in port_by_uuid:
                    index['bridge_of_port'][uuid] = bridge
        # Only interfaces that belong to a bridge are on the switch.
        for iface in self.interfaces:
            port = index['port_of_iface'].get(iface.name)
            if port is not None and port.uuid in index['bridge_of_port']:
                index['iface'][iface.name] = iface
        object.__setattr__(self, '_index', index)

    def interface(self, name):
        """The Interface row named ``name`` on some bridge, or None."""
        return self._index['iface'].get(name)

    def port_of(self, iface_name):
        return self._index['port_of_iface'].get(iface_name)

    def bridge_of(self, iface_name):
        """The Bridge holding interface ``iface_name``, or None."""
        port = self.port_of(iface_name)
        if port is None:
            return None
        return self._index['bridge_of_port'].get(port.uuid)

    def bridge(self, name):
        return self._index['bridge'].get(name)

    def members(self, bridge):
        """``[(OvsPort, (OvsInterface, …))]`` of a bridge, by port name."""
        port_by_uuid = {p.uuid: p for p in self.ports}
        out = [(port_by_uuid[u], self._index['ifaces_of_port'][u])
               for u in bridge.ports if u in port_by_uuid]
        return sorted(out, key=lambda pair: pair[0].name)


def _rows(table, rows):
    if table == 'Interface':
        return tuple(OvsInterface(
            uuid=_atom(r.get('_uuid')), name=r.get('name', ''),
            type=r.get('type') or '', options=as_map(r.get('options')),
            external_ids=as_map(r.get('external_ids'))) for r in rows)
    if table == 'Port':
        return tuple(OvsPort(
            uuid=_atom(r.get('_uuid')), name=r.get('name', ''),
            interfaces=as_set(r.get('interfaces')),
            tag=as_optional(r.get('tag')),
            other_config=as_map(r.get('other_config'))) for r in rows)
    if table == 'Bridge':
        return tuple(OvsBridge(
            uuid=_atom(r.get('_uuid')), name=r.get('name', ''),
            ports=as_set(r.get('ports')),
            datapath_type=r.get('datapath_type') or '') for r in rows)
    raise ValueError(f"unknown OVSDB table {table!r}")


def snapshot_from_rows(tables, source=''):
    """An :class:`OvsSnapshot` from ``{table: [row dict, …]}``."""
    system = tables.get('Open_vSwitch') or [{}]
    try:
        return OvsSnapshot(
            bridges=_rows('Bridge', tables.get('Bridge', ())),
            ports=_rows('Port', tables.get('Port', ())),
            interfaces=_rows('Interface', tables.get('Interface', ())),
            external_ids=as_map(system[0].get('external_ids')),
            source=source)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise OvsdbError(
            f"unexpected OVSDB rows from {source}: {exc!r}") from exc


def snapshot_from_vsctl(outputs, source='ovs-vsctl'):
    """An :class:`OvsSnapshot` from ``ovs-vsctl --format=json list``.

    :param outputs: ``{table: stdout}`` of ``ovs-vsctl --format=json
        --data=json --columns=… list TABLE`` for each table of
        :data:`COLUMNS` (see :func:`vsctl_argv`)
    """
    tables = {}
    for table, text in outputs.items():
        try:
            doc = json.loads(text)
            headings = doc['headings']
            tables[table] = [dict(zip(headings, row)) for row in doc['data']]
        except (ValueError, KeyError, TypeError) as exc:
            raise OvsdbError(
                f"unreadable '{source} list {table}' output: {exc!r}"
            ) from exc
    return snapshot_from_rows(tables, source=source)


def vsctl_argv(table, db=None, timeout_s=10):
    """``ovs-vsctl`` argument list listing ``table``'s :data:`COLUMNS`
    (giving up after ``timeout_s`` if the database does not answer)."""
    argv = ['ovs-vsctl', f'--timeout={max(1, int(timeout_s))}']
    if db:
        argv.append(f'--db={db}')
    return argv + ['--format=json', '--data=json',
                   '--columns=' + ','.join(COLUMNS[table]), 'list', table]


# --- the JSON-RPC client -----------------------------------------------------

def parse_connection(connection):
    """``(family, address)`` of ``unix:PATH`` or ``tcp:HOST:PORT``."""
    kind, _, rest = (connection or '').partition(':')
    if kind == 'unix' and rest:
        return socket.AF_UNIX, rest
    if kind == 'tcp':
        host, _, port = rest.rpartition(':')
        host = host.strip('[]')
        if host and port.isdigit() and 0 < int(port) < 65536:
            family = socket.AF_INET6 if ':' in host else socket.AF_INET
            return family, (host, int(port))
    raise ValueError(
        f"OVSDB connection {connection!r} is neither unix:PATH nor "
        "tcp:HOST:PORT")


class OvsdbClient:
    """Reads OVSDB over one connection, bounded in time and bytes.

    :param connection: ``unix:PATH`` or ``tcp:HOST:PORT``
    :param timeout_s: for connecting and for the whole exchange
    :param max_bytes: the most a reply may hold
    :param netns_name: open a ``tcp:`` connection inside this network
        namespace (its loopback); unix sockets are reached through the
        file system whatever the namespace
    """

    def __init__(self, connection, timeout_s=DEFAULT_TIMEOUT_S,
                 max_bytes=DEFAULT_MAX_BYTES, netns_name=None):
        self.connection = connection
        self.family, self.address = parse_connection(connection)
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.netns_name = netns_name
        self._next_id = 0

    def _error(self, what):
        return OvsdbError(f"OVSDB at {self.connection}: {what}")

    def _connect(self):
        try:
            if self.family == socket.AF_UNIX or self.netns_name is None:
                sock = socket.socket(self.family, socket.SOCK_STREAM)
            else:
                sock = netns.socket_in_netns(self.netns_name, self.family,
                                             socket.SOCK_STREAM)
        except (OSError, netns.NetnsError) as exc:
            raise self._error(f"cannot open a socket: {exc}") from exc
        try:
            sock.settimeout(self.timeout_s)
            sock.connect(self.address)
        except FileNotFoundError as exc:
            sock.close()
            raise OvsdbAbsent(
                f"OVSDB at {self.connection}: cannot connect: {exc} (no "
                "Open vSwitch here?)") from exc
        except OSError as exc:
            sock.close()
            raise self._error(f"cannot connect: {exc}") from exc
        return sock

    def transact(self, *operations):
        """The results of one ``transact`` of ``operations`` (a list)."""
        self._next_id += 1
        request = {'method': 'transact', 'params': [DATABASE, *operations],
                   'id': self._next_id}
        deadline = time.monotonic() + self.timeout_s
        sock = self._connect()
        try:
            self._send(sock, request, deadline)
            reply = self._await(sock, request['id'], deadline)
        finally:
            sock.close()
        if reply.get('error') is not None:
            raise self._error(f"transact failed: {reply['error']!r}")
        results = reply.get('result')
        if not isinstance(results, list) or \
                len(results) != len(operations):
            raise self._error(f"unexpected transact result {results!r:.200}")
        for op, result in zip(operations, results):
            if not isinstance(result, dict) or result.get('error'):
                raise self._error(
                    f"{op.get('op')} on {op.get('table')} failed: "
                    f"{result!r:.200}")
        return results

    def _send(self, sock, message, deadline):
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.sendall(json.dumps(message).encode())
        except OSError as exc:
            raise self._error(f"cannot send: {exc}") from exc

    def _await(self, sock, request_id, deadline):
        """Read messages until the reply to ``request_id``."""
        buf = b''
        total = 0
        decoder = json.JSONDecoder()
        while True:
            while buf.strip():
                message, used = self._decode(buf, decoder)
                if message is None:
                    break       # incomplete: read more
                buf = buf[used:]
                if not isinstance(message, dict):
                    raise self._error(
                        f"not a JSON-RPC message: {message!r:.200}")
                if message.get('method') == 'echo':
                    # The server's keepalive: answer it (RFC 7047 4.1.11).
                    self._send(sock, {'result': message.get('params'),
                                      'id': message.get('id')}, deadline)
                    continue
                if 'method' not in message and \
                        message.get('id') == request_id:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(
                    f"no complete reply within {self.timeout_s:g} s "
                    f"({total} bytes read)")
            sock.settimeout(left)
            try:
                chunk = sock.recv(_CHUNK)
            except socket.timeout:
                raise self._error(
                    f"no complete reply within {self.timeout_s:g} s "
                    f"({total} bytes read)") from None
            except OSError as exc:
                raise self._error(f"read failed: {exc}") from exc
            if not chunk:
                what = 'an incomplete or invalid' if buf.strip() else 'no'
                raise self._error(
                    f"connection closed with {what} reply "
                    f"({total} bytes read)")
            total += len(chunk)
            if total > self.max_bytes:
                raise self._error(
                    f"reply exceeds {self.max_bytes} bytes; refused")
            buf += chunk

    def _decode(self, buf, decoder):
        """``(message, bytes used)`` from the front of ``buf``, or
        ``(None, 0)`` while it is incomplete."""
        try:
            text = buf.decode('utf-8')
        except UnicodeDecodeError as exc:
            if exc.reason != 'unexpected end of data':
                raise self._error(f"reply is not UTF-8: {exc}") from None
            text = buf[:exc.start].decode('utf-8')
        stripped = text.lstrip()
        try:
            message, end = decoder.raw_decode(stripped)
        except ValueError:
            return None, 0
        used = len(text) - len(stripped) + end
        return message, len(text[:used].encode('utf-8'))

    def snapshot(self):
        """An :class:`OvsSnapshot` of the tables in :data:`COLUMNS`."""
        tables = list(COLUMNS)
        results = self.transact(*(
            {'op': 'select', 'table': t, 'where': [],
             'columns': list(COLUMNS[t])} for t in tables))
        rows = {}
        for table, result in zip(tables, results):
            found = result.get('rows')
            if not isinstance(found, list) or \
                    not all(isinstance(r, dict) for r in found):
                raise self._error(f"unexpected rows of {table}: "
                                  f"{found!r:.200}")
            rows[table] = found
        return snapshot_from_rows(rows, source=self.connection)


def read_snapshot(connection, timeout_s=DEFAULT_TIMEOUT_S,
                  max_bytes=DEFAULT_MAX_BYTES, netns_name=None):
    """One :class:`OvsSnapshot` read over ``connection``."""
    return OvsdbClient(connection, timeout_s, max_bytes,
                       netns_name).snapshot()
