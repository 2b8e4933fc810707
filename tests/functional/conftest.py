"""Fixtures for functional tests: real namespaces, veth, bridge, iptables.

These tests need root.  When the lab cannot be built they fail with the
reason (never skip): a skipped real test hides a broken product.
"""

import itertools
import os
import secrets

import pytest

from netweaver_agent import capture
from netweaver_agent import lab as lab_mod

_counter = itertools.count()


def unique_prefix(tag='t'):
    """A namespace prefix no other test run uses at the same time."""
    return f'nw{tag}{os.getpid()}{secrets.token_hex(2)}{next(_counter)}-'


def require_root():
    if os.geteuid() != 0:
        pytest.fail('functional tests build network namespaces and need '
                    f'root; running as uid {os.geteuid()}')


@pytest.fixture
def lab_factory():
    """``make(**LabSpec fields) -> built Lab``; every lab is torn down.

    ``prefix`` defaults to a unique one.  Extra keyword ``lab_class``
    builds a subclass of :class:`lab.Lab`.
    """
    require_root()
    labs = []

    def make(lab_class=lab_mod.Lab, **fields):
        fields.setdefault('prefix', unique_prefix())
        the_lab = lab_class(lab_mod.LabSpec(**fields))
        labs.append(the_lab)
        try:
            return the_lab.build()
        except lab_mod.LabError as exc:
            pytest.fail(f'the namespace lab could not be built: {exc}')

    yield make
    errors = []
    for the_lab in reversed(labs):
        try:
            the_lab.teardown()
        except lab_mod.LabError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail('lab teardown left things behind: ' + '; '.join(errors))


def pif_times(batch, pif):
    """``{seq: t_ns}``: when each probe was first received on the pif."""
    out = {}
    names = batch.ifnames
    for key, index, t_ns, direction in zip(batch.keys, batch.ifindex,
                                           batch.t_ns, batch.direction):
        if (not key & 1 and names[index] == pif
                and direction != capture.DIR_OUT):
            seq = key >> 1
            out[seq] = min(t_ns, out.get(seq, t_ns))
    return out


def probe_times(batch, pif, vif):
    """``{seq: (t_pif_ns, t_vif_ns)}`` for probes seen on both.

    ``t_pif`` is the first time the probe was *received* on the pif,
    ``t_vif`` the first time it was seen on the vif, both CLOCK_REALTIME
    kernel timestamps from the window's :class:`capture.SightingBatch`.
    """
    at_pif, at_vif = {}, {}
    names = batch.ifnames
    for key, index, t_ns, direction in zip(batch.keys, batch.ifindex,
                                           batch.t_ns, batch.direction):
        if key & 1:
            continue
        seq, name = key >> 1, names[index]
        if name == pif and direction != capture.DIR_OUT:
            at_pif[seq] = min(t_ns, at_pif.get(seq, t_ns))
        elif name == vif:
            at_vif[seq] = min(t_ns, at_vif.get(seq, t_ns))
    return {seq: (at_pif[seq], at_vif[seq])
            for seq in at_pif.keys() & at_vif.keys()}
