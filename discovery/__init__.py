"""discovery: the control plane.

Will own: registries (Kubernetes, lab) translated into workload, service and
authorization resources, served to proxies as incremental xDS (Delta ADS),
and the Kubernetes side of identity (TokenReview, the node index, root
certificate distribution).
"""
