"""The lab's telemetry pipeline with the real agent, for functional tests."""

import contextlib
import os

import pytest

from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import downstream
from netweaver_agent.lab import pipeline


@contextlib.contextmanager
def running(the_lab, workdir, interval_s, settings=None, probe=None,
            what='the pipeline'):
    """``(pipe, agent)``: the lab's telemetry pipeline (``settings``)
    started, its logs under ``workdir``, and the real
    ``ceilometer-polling`` publishing to it every ``interval_s`` with the
    ``probe`` options (the lab's probe options by default).  The test
    fails naming ``what`` if the pipeline cannot start; agent and
    pipeline are stopped at the end, also on failure."""
    pipe = pipeline.Pipeline(the_lab, settings,
                             logs_to=os.path.join(workdir, 'logs'),
                             progress=print)
    agent = None
    try:
        try:
            pipe.start()
        except pipeline.PipelineError as exc:
            pytest.fail(f'{what} could not start: {exc}')
        if probe is None:
            probe = downstream.lab_probe_options(the_lab, interval_s)
        files = labagent.write_files(
            the_lab, os.path.join(workdir, 'agent'), interval_s=interval_s,
            probe=probe, extra=pipe.agent_extra())
        agent = labagent.PollingAgent(files, the_lab.spec.hv_netns)
        agent.start()
        yield pipe, agent
    finally:
        if agent is not None:
            agent.stop()
        pipe.stop()
