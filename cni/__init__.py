"""cni: capturing pod traffic.

Will own: the thin chained CNI plugin (``underpass-cni``), the node agent
(enrolment decisions, redirection rules inside each pod's network namespace,
the ZDS server that hands pod namespaces to ztunnel) and the node installer.
"""
