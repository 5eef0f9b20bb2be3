"""discovery: the control plane.

Owns the registries (:mod:`discovery.registries`: Kubernetes list+watch, the
lab registry, a YAML model file), the registry-neutral model
(:mod:`discovery.model`), its translation into workload, service and
authorization resources (:mod:`discovery.translate`, failing closed on what L4
cannot enforce), and the gRPC server that serves them as incremental xDS
(Delta ADS) together with the CA (:mod:`discovery.server`). The Kubernetes side
of identity (node index from watched pods, root certificate ConfigMaps) lives
here too.
"""
