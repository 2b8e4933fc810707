"""The Ceilometer polling agent's plugin.

Meters, the latency inspector (vNICs, paths, one window per cycle),
topology (sysfs, OVSDB), privsep, and every option (``opts``).
"""
