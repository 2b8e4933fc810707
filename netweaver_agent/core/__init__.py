"""The measurement itself, for every other room.

Probe wire format, fixed-offset keys, sightings, live capture, pcap and
pcapng readers, the matcher and its statistics, one probe window.  Imports
nothing of ours outside ``core``.
"""
