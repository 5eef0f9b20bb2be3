"""ztunnel: the per-node L4 tunnel.

Owns, for every captured pod on its node:

- the pods (:mod:`ztunnel.pods`, :mod:`ztunnel.pod`, :mod:`ztunnel.inpod`):
  ZDS with the node agent and listeners inside each pod's network namespace
  (15001 outbound, 15006 inbound plaintext, 15008 inbound HBONE);
- the data paths (:mod:`ztunnel.routing` plans, HBONE over
  :mod:`underpass.hbone`), L4 authorization (:mod:`ztunnel.policy`) and the
  connection tracker (:mod:`ztunnel.connections`);
- the proxy state (:mod:`ztunnel.state`: one writer, consistent snapshots)
  from the control plane (:mod:`ztunnel.xds_source`) or a local file
  (:mod:`ztunnel.local_config`);
- the pods' identities (:mod:`ztunnel.identities`: TLS contexts only, over
  :mod:`identity.certmanager`; keys are made with :mod:`identity.keys`, so the
  process never loads the ``cryptography`` package);
- telemetry and operations: metrics (:mod:`ztunnel.metrics`, written by
  :mod:`underpass.promtext`), admin, readiness and the config dump
  (:mod:`ztunnel.admin`, :mod:`ztunnel.dump`);
- the deployment modes other than the node-shared one: our own sidecar
  (:mod:`ztunnel.dedicated`) and a worker per service account
  (:mod:`ztunnel.isolation`).

:mod:`ztunnel.app` wires them into the ``underpass ztunnel`` process.
"""
