"""``underpass compare``: proxy memory in ambient mode against sidecar mode.

Owns the comparison of the mesh's deployment modes (issue 6). In the lab:
for each pod count it builds a lab of its own, sets up each deployment mode
in it in turn (:mod:`underpass.compare.modes`: pluggable classes), drives the
same HTTP traffic with a real load generator (:mod:`underpass.compare.loadgen`,
Fortio), measures every proxy process (:mod:`underpass.compare.measure`: RSS
and PSS from ``smaps_rollup``, CPU seconds from ``stat``) and reports a table,
JSON and a chart (:mod:`underpass.compare.report`); each mode proves that
the load went through its proxies with mTLS (:mod:`underpass.compare.evidence`:
who reached whom as whom, from the proxies' metrics and access logs);
:mod:`underpass.compare.runner` ties the steps together and cleans up on
every exit path. On a real cluster (``--kube``): :mod:`underpass.compare.kube`
reads the proxies' memory from their metrics endpoints.

Like the rest of the core, it never imports a component: ztunnel, the control
plane and Envoy run as processes.
"""
