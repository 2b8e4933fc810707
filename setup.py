import setuptools

setuptools.setup(
    # Optional: without a C compiler and Python's headers the package
    # installs without it and reads captures with the same loops in
    # Python (netweaver_agent/core/pcapwalk.py).
    ext_modules=[
        setuptools.Extension('netweaver_agent.core._pcapwalk',
                             ['netweaver_agent/core/_pcapwalk.c'],
                             optional=True),
        # The same for the packed sender's pacing loop (pacing.pace
        # otherwise).
        setuptools.Extension('netweaver_agent.core._sendloop',
                             ['netweaver_agent/core/_sendloop.c'],
                             optional=True),
        # The same for the probes' tags and IPv4 packets (probe.Tagger's
        # and probe.V4Builder's Python loops otherwise).
        setuptools.Extension('netweaver_agent.core._probebuild',
                             ['netweaver_agent/core/_probebuild.c'],
                             optional=True),
    ],
)
