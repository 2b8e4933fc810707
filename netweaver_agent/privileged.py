"""Where the privsep daemons' contexts are found by the paths in sudoers.

``privsep-helper --privsep_context netweaver_agent.privileged.capture_pctxt``
(and ``netns_pctxt``) is what operators allowed in sudoers or rootwrap
before the package had rooms; the contexts now live in
:mod:`netweaver_agent.agent.privileged`, and these names still resolve to
the same objects, so the allowed command line is unchanged.
"""

from netweaver_agent.agent.privileged import capture_pctxt  # noqa: F401
from netweaver_agent.agent.privileged import netns_pctxt  # noqa: F401
