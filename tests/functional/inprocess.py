"""Ceilometer's discovery and our six meters, in this test process.

Real Ceilometer configuration, libvirt ``test:///`` discovery and
inspector, our pollsters and their privsep daemon (started with this
process's root); the capture is opened in the lab's hypervisor namespace
(``capture_netns``), probes are sent from the source namespace.  Used by
test_faults.py and test_flood.py.
"""

import logging
import os
from xml.etree import ElementTree

from ceilometer.compute import discovery
from ceilometer import service

from netweaver_agent.agent import inspector
from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.agent import privileged
from netweaver_agent.lab import agent
from netweaver_agent.lab import virt

METERS = pollsters.METERS


class _Recorder(logging.Handler):
    def __init__(self, records):
        super().__init__(logging.DEBUG)
        self.records_list = records

    def emit(self, record):
        self.records_list.append(record)


RUNSTATE = '{http://libvirt.org/schemas/domain/test/1.0}runstate'


def configure(uri, **options):
    """A Ceilometer configuration discovering the guests of the libvirt
    ``uri`` by their metadata, with our ``options`` (group netweaver)."""
    conf = service.prepare_service([], [])
    opts.register_opts(conf)
    conf.set_override('libvirt_uri', uri)
    conf.set_override('hypervisor_inspector', 'libvirt')
    conf.set_override('instance_discovery_method', 'libvirt_metadata',
                      group='compute')
    for name, value in options.items():
        conf.set_override(name, value, group=opts.GROUP)
    return conf


class Cycle:
    """One lab, one Ceilometer configuration; :meth:`run` polls once."""

    def __init__(self, the_lab, workdir, **options):
        self.lab = the_lab
        self.domains = agent.guest_domains(the_lab)
        self.node = os.path.join(workdir, 'node.xml')
        uri = virt.write_node(self.node, self.domains)
        options.setdefault('probe_source', f'netns:{the_lab.spec.src_netns}')
        options.setdefault('capture_netns', the_lab.spec.hv_netns)
        conf = configure(uri, **options)
        self.conf = conf
        self.meters = [cls(conf) for cls in METERS]
        self.discovery = discovery.InstanceDiscovery(conf)
        # Discovery's connection opens now, on the lab's node as written.
        self.discovery.discover(None)
        self.inspector = pollsters.INSPECTOR.current
        # prepare_service() set up oslo.log: record our lines here.
        self.records = []
        self._handler = _Recorder(self.records)
        logger = logging.getLogger('netweaver_agent')
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self._handler)

    def log_text(self):
        """Every line our modules logged so far."""
        return '\n'.join(f'{r.levelname} {r.getMessage()}'
                         for r in self.records)

    def close(self):
        logging.getLogger('netweaver_agent').removeHandler(self._handler)
        self.inspector.source.close()

    def libvirt_view(self, shut_off=(), missing=()):
        """Change what libvirt tells our pollsters about the lab's guests.

        The ``test:///`` driver reads its node file when a connection
        opens and keeps its state per connection.  The node file is
        rewritten (domains of guests ``shut_off`` in run state 5, shut
        off; guests ``missing`` left out) and our inspector's connection
        closed and forgotten: Ceilometer's inspector opens a new one on its
        next call (``refresh_libvirt_connection``), as after a libvirtd
        restart.  Ceilometer's discovery
        keeps its own connection, so it still lists every guest.
        """
        node = ElementTree.Element('node')
        for dom in self.domains:
            if dom.index in missing:
                continue
            element = virt.domain_element(dom)
            if dom.index in shut_off:
                ElementTree.SubElement(element, RUNSTATE).text = '5'
            node.append(element)
        with open(self.node, 'w', encoding='utf-8') as f:
            f.write(ElementTree.tostring(node, encoding='unicode'))
        libvirt = self.inspector.libvirt
        libvirt.connection.close()
        libvirt._libvirt_connection = None

    def run(self):
        """One polling cycle: ``{meter name: [Sample]}`` and the cache."""
        instances = self.discovery.discover(None)
        cache = {}
        samples = {m.sample_name: list(m.get_samples(None, cache, instances))
                   for m in self.meters}
        return samples, cache[inspector.CACHE_KEY]

    def resource_of(self, guest_index):
        """The resource id our samples carry for one lab guest."""
        return agent.resource_ids(self.lab)[
            self.lab.guests[guest_index].vif]


def by_resource(samples):
    """``{meter: {resource_id: volume}}``."""
    return {name: {s.resource_id: s.volume for s in found}
            for name, found in samples.items()}


def cycles(tmp_path):
    """Fixture body: ``make(lab, **[netweaver] options) -> Cycle``.

    Singletons reset before and after, privsep daemons stopped.  Use as
    ``yield from inprocess.cycles(tmp_path)`` in a fixture.
    """
    def reset():
        pollsters.INSPECTOR.reset()

    reset()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    made = []

    def make(the_lab, **options):
        workdir = tmp_path / f'cycle{len(made)}'
        workdir.mkdir()
        c = Cycle(the_lab, str(workdir), **options)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
    privileged.stop()
    reset()
    # prepare_service() set up Ceilometer's logging: give pytest its own.
    root.setLevel(saved[0])
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    for h in saved[1]:
        if h not in root.handlers:
            root.addHandler(h)
