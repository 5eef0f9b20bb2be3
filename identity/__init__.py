"""Workload identity for Underpass.

This package owns everything about *who* a workload is and how that is proven:

- :mod:`identity.spiffe`: the SPIFFE ID type (``spiffe://<td>/ns/<ns>/sa/<sa>``).
- :mod:`identity.ca`: the certificate authority (self-signed or plugged-in
  root, CSR checks, workload and serving certificates).
- :mod:`identity.auth`: who is calling the CA (lab token file, Kubernetes
  TokenReview) and which pods run on which node (for impersonation).
- :mod:`identity.server` / :mod:`identity.client`: the CA's gRPC API
  (``istio.v1.auth.IstioCertificateService``), server and client.
- :mod:`identity.certmanager`: one key and certificate per service account,
  fetched, shared and rotated for the data plane.
- :mod:`identity.tls`: mTLS ``ssl.SSLContext`` builders and SPIFFE peer checks.

It depends on nothing else in this repository; everything else may depend on it.
"""
