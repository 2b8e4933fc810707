"""The privsep daemon in the functional tests: a window it captures, the
processes of a namespace and what /proc says of them."""

from netweaver_agent.agent import privileged
from netweaver_agent.core import netns
from netweaver_agent.core import window


def daemon_window(the_lab, source, settings, ctx, paths=None):
    """One window to ``paths`` (the lab's by default) captured by
    ``ctx``'s daemon; source and daemon closed."""
    try:
        return window.run_window(
            the_lab.paths() if paths is None else paths, source, settings,
            capture_netns=the_lab.spec.hv_netns,
            capture_class=privileged.capture_class(ctx))
    finally:
        source.close()
        privileged.stop()


def status(pid):
    """``/proc/PID/status`` as ``{field: [words]}``."""
    fields = {}
    with open(f'/proc/{pid}/status', encoding='ascii') as f:
        for line in f:
            key, _, value = line.partition(':')
            fields[key] = value.split()
    return fields


def processes(netns_name, marker):
    """The pids in ``netns_name`` whose command line contains
    ``marker``."""
    proc = netns.run(['ip', 'netns', 'pids', netns_name], check=False)
    out = []
    for pid in proc.stdout.split():
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read().replace(b'\0', b' ').decode()
        except OSError:
            continue
        if marker in cmdline:
            out.append(int(pid))
    return out


def route_local_through_the_pif(the_lab):
    """``local`` probes leave by mgmt0 and come back in through the pif."""
    a = the_lab.spec.mgmt_addresses()
    net = the_lab.spec.network
    netns.run(['ip', 'route', 'add', net, 'via', a.src],
              netns=the_lab.spec.hv_netns)
    netns.run(['sysctl', '-qw', 'net.ipv4.ip_forward=1'],
              netns=the_lab.spec.src_netns)
    for g in the_lab.guests:
        netns.run(['ip', 'route', 'add', the_lab.spec.mgmt_network, 'via',
                   the_lab.spec.src_address], netns=g.netns)
