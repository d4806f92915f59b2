"""One router per resource: runs, teachers, verifiers, health (with Prometheus ``/metrics``)."""
