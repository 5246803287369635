"""The Prometheus text format."""

from koff.serve.metrics import Metrics


def test_render_counters_gauges_and_histograms():
    m = Metrics()
    m.counter("requests_total", "requests")
    m.gauge("queue_depth", "waiting", lambda: {(): 3.0})
    m.histogram("latency_seconds", "latency", (0.1, 1.0))
    m.inc("requests_total", endpoint="/v1/completions", status="200")
    m.inc("requests_total", 2, endpoint="/v1/completions", status="200")
    m.inc("requests_total", endpoint='/a"b', status="404")
    for v in (0.05, 0.5, 5.0):
        m.observe("latency_seconds", v)
    text = m.render()
    assert '# TYPE koff_requests_total counter' in text
    assert 'koff_requests_total{endpoint="/v1/completions",status="200"} 3' in text
    assert 'koff_requests_total{endpoint="/a\\"b",status="404"} 1' in text
    assert "koff_queue_depth 3" in text
    assert 'koff_latency_seconds_bucket{le="0.1"} 1' in text
    assert 'koff_latency_seconds_bucket{le="1"} 2' in text
    assert 'koff_latency_seconds_bucket{le="+Inf"} 3' in text
    assert "koff_latency_seconds_count 3" in text and "koff_latency_seconds_sum 5.55" in text
    assert m.value("requests_total", endpoint="/v1/completions", status="200") == 3
