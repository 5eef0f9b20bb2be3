"""Registry adapters: where the discovery model comes from.

Each adapter implements :class:`discovery.registry.Registry` (``start(sink)``,
``stop()``) and keeps a :class:`~discovery.registries.nodeindex.ModelNodeIndex`
that the CA in the same process uses for impersonation checks:

- :mod:`discovery.registries.lab`: the lab's state (+ a policy directory);
- :mod:`discovery.registries.kubernetes`: the Kubernetes API (list + watch);
- :mod:`discovery.registries.rootcert`: publishes the CA's root certificate
  into every namespace (ConfigMap ``istio-ca-root-cert``), driven by the
  Kubernetes registry's namespace watch.

:mod:`discovery.registries.objects` parses Kubernetes objects into the model
for both. Modules are imported on use (the Kubernetes client is only needed
by the Kubernetes registry).
"""
