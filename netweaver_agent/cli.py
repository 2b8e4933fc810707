"""The ``netweaver`` command.

Subcommands live in :mod:`netweaver_agent.cmd`, one module each, with
``add_parser(subparsers)`` and ``run(args) -> int``:

* ``lab``: build the namespace lab, probe it, print the report (default)
* ``analyze``: the report from two pcap files (pif and vif)
* ``measure``: the seed's job, over SSH, on a real hypervisor

Only this command writes to stdout; the agent path logs.
"""

import argparse
import importlib
import sys

from oslo_config import cfg
from oslo_log import log

COMMANDS = ('lab', 'analyze', 'measure')
LOG = log.getLogger(__name__)


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
        module = importlib.import_module(f'netweaver_agent.cmd.{name}')
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
