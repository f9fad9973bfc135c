"""Prometheus metrics of a server (prometheus_client, one registry per server): queue depth
and running requests (read from the engine at scrape time), tokens generated, and histograms
of time to first token, inter-token latency and recurrent loops per token."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("mythos_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("mythos_running_requests", "Requests holding a slot", registry=r)
        self.tokens = Counter("mythos_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("mythos_requests", "Requests ended, by finish reason", ["reason"], registry=r)
        self.ttft = Histogram("mythos_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("mythos_inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.loops = Histogram("mythos_loops_per_token", "Recurrent loops a token ran before halting",
                               buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r)

    def token(self, handle, tok, previous) -> None:
        self.tokens.inc()
        self.loops.observe(tok.loops_used)
        if previous is None:
            self.ttft.observe(tok.time - handle.submitted)
        else:
            self.itl.observe(tok.time - previous.time)

    def finished(self, handle) -> None:
        self.requests.labels(handle.finish_reason or "cancelled").inc()

    def render(self) -> bytes:
        s = self.engine.stats()
        self.queue.set(s.queued)
        self.running.set(s.running)
        return generate_latest(self.registry)
