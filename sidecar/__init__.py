"""Tollway's sidecar: the decision path Envoy and backends call on every request."""

__version__ = "0.2.0"
