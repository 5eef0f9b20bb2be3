"""Underpass shared core and command line.

Owns what the components share: the ``underpass`` command, logging and
metrics set-up, configuration, and (as later work lands) the HBONE protocol
core, xDS plumbing, generated protobuf modules and the local lab (a cluster of
network namespaces). Components (ztunnel, waypoint, cni, discovery) import the
core, never each other; the core imports only :mod:`identity`.
"""

__version__ = "0.1.0"
