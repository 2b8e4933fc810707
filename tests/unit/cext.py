"""Our optional C extensions in the tests: skipped where they were not
built, failed where they are expected (CI: ``NETWEAVER_REQUIRE_PCAPWALK=1``,
set by tools/test.sh)."""

import os

import pytest


def need(module, name):
    """Skip the calling test when ``module`` (the imported extension, or
    None) is missing; fail instead where the extensions are required."""
    if module is None:
        if os.environ.get('NETWEAVER_REQUIRE_PCAPWALK') == '1':
            pytest.fail(f'netweaver_agent.core.{name} was not built '
                        '(a C compiler and Python headers are needed)')
        pytest.skip(f'netweaver_agent.core.{name} not built')
