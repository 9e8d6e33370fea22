"""Textbot's samples in Ray's Prometheus export."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def textbot_samples(metrics_url: str, app: str) -> dict[str, float]:
    """Textbot's metric samples for one application, summed over replicas and tags but
    the finish reason and the part: name (and finish reason or part) -> value."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("ray_textbot_") and sample.labels.get("application") == app:
                tag = sample.labels.get("finish_reason") or sample.labels.get("part")
                key = sample.name + (f"[{tag}]" if tag else "")
                if "le" not in sample.labels:  # bucket counts are cumulative; count and sum suffice here
                    samples[key] = samples.get(key, 0.0) + sample.value
    return samples
