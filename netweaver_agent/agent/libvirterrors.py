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
