"""The lab: a Kubernetes-like cluster made of Linux network namespaces on one machine.

Nodes are network namespaces joined by an underlay (a veth per node to a bridge
in the lab's own "fabric" namespace); pods are network namespaces wired by the
real CNI plugins, invoked exactly as a container runtime invokes them. The
:mod:`underpass.lab.registry` plays the Kubernetes API's part for every component
running in lab mode (discovery, the CA's node checks, the CNI node agent).

Modules:

- :mod:`underpass.lab.registry`: the object store (nodes, namespaces, pods,
  services), its on-disk format, locking and the event-driven ``watch()``.
- :mod:`underpass.lab.cni_runner`: builds the CNI chain and runs the plugins as a
  CNI 1.0 runtime does (env, stdin config, ``prevResult``, result cache).
- :mod:`underpass.lab.netns`: network-namespace helpers (create, enter, sysctl).
- :mod:`underpass.lab.procs`: processes the lab starts (tracked so ``down`` stops them).
- :mod:`underpass.lab.agents`: the node agents (``underpass cni-agent``), one per node.
- :mod:`underpass.lab.cluster`: ``up`` / ``down`` / ``add_pod`` / ``delete_pod`` / labels.
- :mod:`underpass.lab.sampleapp`: HTTP and raw-TCP echo servers and their clients.
- :mod:`underpass.lab.sockets`: sockets made inside a netns, to look at capture.

Only the registry is imported by other components; the rest is the lab's own.
"""
