"""Every Redis key, script and round trip of visionq: jobs, API keys, rate limits, the worker registry, the
broker (Celery's Redis transport) and the pub/sub behind ?wait. The modules are imported one by one; this package
imports nothing, so that a process loads only what it uses."""
