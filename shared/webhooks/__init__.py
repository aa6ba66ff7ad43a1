"""Webhooks on job completion: the event and its signature, endpoints and deliveries, the retry schedule, what a
target may be, the Redis side (the outbox itself is written by the terminal transition, shared/store/lua/), the
sender, and the CPU delivery worker's Celery app."""
