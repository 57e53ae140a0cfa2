"""Prometheus counters served at /metrics (per process; Prometheus sums across processes)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SIGN_OPERATIONS = Counter(
    "signgate_sign_operations_total", "Signing operations recorded, by outcome.", ["status"]
)
SIGNING_REQUESTS_OPENED = Counter("signgate_signing_requests_opened_total", "Signing requests opened.")
DECISIONS = Counter(
    "signgate_decisions_total", "Approve, reject and cancel calls, by outcome.", ["decision", "outcome"]
)
DECISION_SECONDS = Histogram(
    "signgate_decision_seconds",
    "Time from an approve/reject/cancel call to its durable answer.",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
