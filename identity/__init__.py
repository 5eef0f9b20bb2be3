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
- :mod:`identity.certs`: a workload's key and certificate as the data plane
  holds them (bytes and the few facts it reads).
- :mod:`identity.keys` / :mod:`identity.der`: workload keys and CSRs with the
  process's own OpenSSL, and the X.509 fields the data plane reads, without
  the ``cryptography`` package (which only the CA side loads: the data plane's
  modules here never import it).

It depends on nothing else in this repository; everything else may depend on it.
"""
