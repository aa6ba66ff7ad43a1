"""The `visionq` command and what it starts on one machine: the local stack, the worker supervisor, the demo, the
HTTP client and the batch submitter, the webhook listener and the tiny models. Nothing else imports it."""
