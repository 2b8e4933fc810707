"""SSH, for the agent and the command alike.

Paramiko sessions with bounded reads, the sender run on a remote host,
the ``ssh://`` probe source.
"""
