"""The namespace lab, for tests and demos: only ``netweaver lab`` imports it.

Spec and build (Linux bridge, OVS, OVN), delay and loss injection with
recorded truth, libvirt ``test:///`` XML, the real agent and pipeline.
"""
