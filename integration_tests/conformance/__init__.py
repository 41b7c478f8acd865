"""Conformance: the peers' own published test suites, run against our drop-in APIs.

``peers`` fetches the suites (cached under ``.cache/conformance/``, never committed), ``suites`` runs
each one twice in pytest subprocesses (the real peer, then ours) and tells which tests count,
``routing_shim`` is the pytest plugin that routes the peer's API to the target and records who
reached it, ``dist_runner`` runs one module in each rank of a 2-process gloo job.
"""
