"""Queueing and scheduling: the job queue/store interfaces, their implementations, and the runner."""
