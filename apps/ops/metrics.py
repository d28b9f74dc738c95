"""Prometheus metrics, read from PostgreSQL and Redis at scrape time.

The web server may run several processes (uvicorn --workers, several containers), and
requests are recorded by whichever one served them: in-process counters would each see
only a share. So nothing is counted in memory; a collector reads the system of record
on every scrape: usage records (plus the totals of records retention removed, so
counters never go down), deployments and replicas, fine-tunes, and workers' heartbeats.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import redis
from django.db.models import Count
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from apps.deployments import selectors as deployment_selectors
from apps.deployments.models import Deployment, State
from apps.finetune.models import FineTuneJob, JobState
from apps.inference.models import UsageRecord
from apps.ops.models import LATENCY_BUCKETS_SECONDS, UsageCarry
from apps.ops.selectors import usage_totals

MIB = 1024 * 1024
REPLICA_STATES = (*State.values, "unavailable")


def _usage() -> dict[tuple[str, str, str], dict[str, Any]]:
    """Totals per (deployment, worker, outcome): kept records plus carried ones."""
    totals: dict[tuple[str, str, str], dict[str, Any]] = {}
    n = len(LATENCY_BUCKETS_SECONDS)
    carried = [
        {
            "deployment_name": c.deployment_name,
            "worker": c.worker,
            "outcome": c.outcome,
            "requests": c.requests,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "latency_sum_ms": c.latency_sum_ms,
            # Buckets counted under other bounds cannot be added: only their +Inf counts.
            "latency_buckets": c.latency_buckets if len(c.latency_buckets) == n else [0] * n,
        }
        for c in UsageCarry.objects.all()
    ]
    for row in [*usage_totals(UsageRecord.objects.all()), *carried]:
        key = (row["deployment_name"], row["worker"], row["outcome"])
        total = totals.setdefault(
            key,
            {
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "latency_sum_ms": 0.0,
                "latency_buckets": [0] * n,
            },
        )
        for field in ("requests", "prompt_tokens", "completion_tokens", "latency_sum_ms"):
            total[field] += row[field]
        total["latency_buckets"] = [
            a + b for a, b in zip(total["latency_buckets"], row["latency_buckets"], strict=True)
        ]
    return totals


def _usage_metrics() -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "aibox_requests",
        "Inference requests, by deployment, worker and outcome.",
        labels=["deployment", "worker", "outcome"],
    )
    prompt = CounterMetricFamily(
        "aibox_prompt_tokens", "Prompt tokens processed.", labels=["deployment", "worker"]
    )
    completion = CounterMetricFamily(
        "aibox_completion_tokens", "Tokens generated.", labels=["deployment", "worker"]
    )
    latency = HistogramMetricFamily(
        "aibox_request_latency_seconds",
        "Time from a request's arrival to its last byte.",
        labels=["deployment", "worker"],
    )
    per_worker: dict[tuple[str, str], dict[str, Any]] = defaultdict(
        lambda: {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "requests": 0,
            "latency_sum_ms": 0.0,
            "latency_buckets": [0] * len(LATENCY_BUCKETS_SECONDS),
        }
    )
    for (deployment, worker, outcome), total in sorted(_usage().items()):
        requests.add_metric([deployment, worker, outcome], total["requests"])
        agg = per_worker[(deployment, worker)]
        for field in ("prompt_tokens", "completion_tokens", "requests", "latency_sum_ms"):
            agg[field] += total[field]
        agg["latency_buckets"] = [
            a + b for a, b in zip(agg["latency_buckets"], total["latency_buckets"], strict=True)
        ]
    for (deployment, worker), agg in sorted(per_worker.items()):
        prompt.add_metric([deployment, worker], agg["prompt_tokens"])
        completion.add_metric([deployment, worker], agg["completion_tokens"])
        buckets = [
            (str(bound), count)
            for bound, count in zip(LATENCY_BUCKETS_SECONDS, agg["latency_buckets"], strict=True)
        ]
        latency.add_metric(
            [deployment, worker],
            [*buckets, ("+Inf", agg["requests"])],
            agg["latency_sum_ms"] / 1000,
        )
    yield from (requests, prompt, completion, latency)


def _deployment_metrics(workers: list) -> Iterator[Metric]:
    state = GaugeMetricFamily(
        "aibox_deployment_state",
        "1 for the deployment's current state, 0 for the others.",
        labels=["deployment", "state"],
    )
    wanted = GaugeMetricFamily(
        "aibox_deployment_replicas_wanted", "Replicas asked for.", labels=["deployment"]
    )
    queue = GaugeMetricFamily(
        "aibox_deployment_queue_depth",
        "Requests waiting or running on the deployment's replicas, from heartbeats.",
        labels=["deployment"],
    )
    replica_state = GaugeMetricFamily(
        "aibox_replica_state",
        "1 for the replica's state as clients see it now (unavailable: its worker is "
        "offline or no longer holds it), 0 for the others.",
        labels=["deployment", "replica", "worker", "state"],
    )
    depth: dict[int, int] = defaultdict(int)
    for worker in workers:
        for replica in worker.replicas:
            depth[replica.get("deployment_id")] += replica.get("queue_depth", 0)
    for deployment in Deployment.objects.prefetch_related("replica_set").order_by("name"):
        for value in State.values:
            state.add_metric([deployment.name, value], 1.0 if deployment.state == value else 0.0)
        wanted.add_metric([deployment.name], deployment.replicas if deployment.running else 0)
        queue.add_metric([deployment.name], depth.get(deployment.pk, 0))
        live = deployment_selectors.replica_live_states(deployment, workers)
        for replica in deployment.replica_set.all():
            current = live.get(replica.pk, replica.state)
            for value in REPLICA_STATES:
                replica_state.add_metric(
                    [deployment.name, str(replica.index), replica.worker, value],
                    1.0 if current == value else 0.0,
                )
    yield from (state, wanted, queue, replica_state)


def _worker_metrics(workers: list) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "aibox_worker_up", "1 while the worker's heartbeats arrive.", labels=["worker", "pool"]
    )
    age = GaugeMetricFamily(
        "aibox_worker_heartbeat_age_seconds",
        "Seconds since the worker's last heartbeat.",
        labels=["worker"],
    )
    cores = GaugeMetricFamily("aibox_worker_cpu_cores", "CPU cores.", labels=["worker"])
    ram_total = GaugeMetricFamily(
        "aibox_worker_memory_total_bytes", "Memory (RAM).", labels=["worker"]
    )
    ram_free = GaugeMetricFamily(
        "aibox_worker_memory_available_bytes", "Memory available.", labels=["worker"]
    )
    gpu_total = GaugeMetricFamily(
        "aibox_worker_gpu_memory_total_bytes", "GPU memory.", labels=["worker", "gpu", "name"]
    )
    gpu_free = GaugeMetricFamily(
        "aibox_worker_gpu_memory_free_bytes",
        "GPU memory free.",
        labels=["worker", "gpu", "name"],
    )
    queue = GaugeMetricFamily(
        "aibox_worker_queue_depth", "Requests waiting or running on the worker.", labels=["worker"]
    )
    replicas = GaugeMetricFamily(
        "aibox_worker_replicas", "Replicas the worker holds.", labels=["worker"]
    )
    now = time.time()
    for w in workers:
        up.add_metric([w.hostname, w.pool], 1.0 if w.online else 0.0)
        age.add_metric([w.hostname], max(0.0, now - w.last_seen))
        cores.add_metric([w.hostname], w.cpu_cores)
        ram_total.add_metric([w.hostname], w.ram_total_mib * MIB)
        ram_free.add_metric([w.hostname], w.ram_available_mib * MIB)
        for gpu in w.gpus:
            labels = [w.hostname, str(gpu.get("index", "")), str(gpu.get("name", ""))]
            gpu_total.add_metric(labels, gpu.get("memory_total_mib", 0) * MIB)
            gpu_free.add_metric(labels, gpu.get("memory_free_mib", 0) * MIB)
        queue.add_metric([w.hostname], w.queue_depth)
        replicas.add_metric([w.hostname], len(w.replicas))
    yield from (up, age, cores, ram_total, ram_free, gpu_total, gpu_free, queue, replicas)


def _finetune_metrics() -> Iterator[Metric]:
    jobs = GaugeMetricFamily("aibox_finetune_jobs", "Fine-tune jobs by state.", labels=["state"])
    counts = dict(FineTuneJob.objects.order_by().values_list("state").annotate(n=Count("pk")))
    for value in JobState.values:
        jobs.add_metric([value], counts.get(value, 0))
    yield jobs


class AiboxCollector(Collector):
    """Everything /metrics shows, read afresh at each scrape."""

    def collect(self) -> Iterator[Metric]:
        redis_up = GaugeMetricFamily(
            "aibox_redis_up", "1 when the workers' heartbeats could be read from Redis."
        )
        try:
            workers = deployment_selectors.worker_list()
            redis_up.add_metric([], 1.0)
        except redis.RedisError:
            workers = []
            redis_up.add_metric([], 0.0)
        yield redis_up
        yield from _usage_metrics()
        yield from _deployment_metrics(workers)
        yield from _worker_metrics(workers)
        yield from _finetune_metrics()


# Only this collector: the web process's own metrics (memory, GC) would describe just the
# one process that answered the scrape.
REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(AiboxCollector())
