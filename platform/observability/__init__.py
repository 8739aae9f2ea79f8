"""Observability: metrics (Ray metrics API -> Prometheus), their recorders, Grafana dashboards."""
