"""The ``netweaver`` command, for operators at a shell.

``lab``, ``analyze`` and ``measure`` (the seed's SSH job), and the report
they all print.
"""
