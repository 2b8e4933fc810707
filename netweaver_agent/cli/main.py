"""The ``netweaver`` command.

Subcommands live in :mod:`netweaver_agent.cli`, one module each, with
``add_parser(subparsers)`` and ``run(args) -> int``:

* ``lab``: build the namespace lab, probe it, print the report (default)
* ``analyze``: the report from two pcap files (pif and vif)
* ``measure``: the seed's job, over SSH, on a real hypervisor

Only this command writes to stdout; the agent path logs.

Standard output is the operator's: a closed one (``netweaver … | head``)
ends the command silently with status 141, as SIGPIPE ends tcpdump; any
other failure to write (a full disk) is one line on stderr, status 1.
Never a traceback.
"""

import argparse
import errno
import importlib
import os
import sys

from oslo_config import cfg
from oslo_log import log

COMMANDS = ('lab', 'analyze', 'measure')
LOG = log.getLogger(__name__)
EXIT_PIPE = 128 + 13        # killed by SIGPIPE, as a shell reports it


class OutputError(Exception):
    """Writing to standard output failed (``errno`` says why)."""

    def __init__(self, exc):
        super().__init__(exc.strerror or str(exc))
        self.errno = exc.errno
        self.strerror = exc.strerror or os.strerror(exc.errno or 0)


class _Output:
    """Standard output whose write errors are :class:`OutputError`, so
    they are told apart from every other ``OSError`` of a command."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as exc:
            raise OutputError(exc) from exc

    def flush(self):
        try:
            self._stream.flush()
        except OSError as exc:
            raise OutputError(exc) from exc

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _discard_stdout():
    """Point fd 1 at /dev/null: what is still buffered for a closed or
    full output must not fail again when Python exits."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    except OSError:
        pass


def build_parser():
    parser = argparse.ArgumentParser(
        prog='netweaver',
        description='Measure how long packets spend inside a compute host, '
                    'from the physical interface to the instance\'s vif '
                    'and back.')
    parser.add_argument('--debug', action='store_true',
                        help='log debug messages to stderr')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name in COMMANDS:
        module = importlib.import_module(f'netweaver_agent.cli.{name}')
        module.add_parser(sub)
    return parser


def setup_logging(debug):
    conf = cfg.ConfigOpts()
    log.register_options(conf)
    conf([], project='netweaver')
    conf.set_override('debug', debug)
    # oslo.log logs to stdout without a log file; stdout is for reports.
    conf.set_override('use_stderr', True)
    log.setup(conf, 'netweaver')


def main(argv=None):
    real = sys.stdout
    if real is not None:
        sys.stdout = _Output(real)
    try:
        try:
            status = _main(argv)
        except SystemExit as exc:       # argparse: --help, usage errors
            status = exc.code
        if real is not None:
            sys.stdout.flush()
        return status
    except OutputError as exc:
        _discard_stdout()
        if exc.errno == errno.EPIPE:
            return EXIT_PIPE
        print(f'netweaver: writing output: {exc.strerror}', file=sys.stderr)
        return 1
    finally:
        if real is not None:
            sys.stdout = real


def _main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.debug)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
