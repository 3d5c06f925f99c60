"""What an operator watches: the structured log (logs) and Prometheus metrics (metrics)."""
