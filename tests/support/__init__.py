"""Test support code shared across tiers (not tests themselves).

- :mod:`tests.support.kubeapi`: builds and caches kube-apiserver and etcd from
  the Go module proxy (``python -m tests.support.kubeapi build``).
- :mod:`tests.support.kubecluster`: runs them on loopback for the k8s tier.
"""
