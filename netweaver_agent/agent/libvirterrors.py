"""libvirt's error reports as exceptions only.

libvirt-python prints every error it raises to stderr as well, unless an
error handler is registered: a polling agent asking for a domain that
has just gone would log it twice, once unformatted.
"""


def quiet_libvirt():
    """Route libvirt's error reports to exceptions only, not stderr."""
    import libvirt

    def _ignore(_ctx, _err):
        pass

    libvirt.registerErrorHandler(_ignore, None)


def domain_id(dom):
    """The hypervisor's id of a running domain (Xen's domid), else None.

    libvirt reports -1 for a domain that is not running and raises
    ``libvirtError`` for one that has just gone; anything else is a bug
    and propagates.
    """
    import libvirt

    try:
        domid = dom.ID()
    except libvirt.libvirtError:
        return None
    return domid if domid >= 0 else None
