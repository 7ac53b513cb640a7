"""The job queue's rules that are not storage, written once for every backend: the estimates a client sees
(ETA, Retry-After), the shared speed average, when a job times out or is given up and how that reads, the claim
window. A backend stores and moves records; it asks this module what they mean.

Units: the speed is seconds per denoising step of one image; work is image-steps (steps x images)."""

from __future__ import annotations

# The queued jobs a claim considers (head first, priority then fair share): bounds each claim's cost.
CLAIM_WINDOW = 64
# A running job past its deadline is failed by the reaper only after this grace: the runner, which stops it at
# its next step, normally records the timeout itself.
RUNNING_GRACE_S = 30.0
# The weight of the latest batch in the speed average.
SPEED_WEIGHT = 0.3
# Retry-After before any speed is known, and its bounds.
UNKNOWN_RETRY_S = 5
MAX_RETRY_S = 300


def blend_speed(old: float | None, latest: float) -> float:
    """The speed average after a batch that ran at `latest` seconds per image-step."""
    return latest if old is None else (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * latest


def queued_eta(position: int, depth: int, queued_work: float, running_left: float, own_work: float,
               speed: float | None) -> float | None:
    """A queued job's seconds until it ends, at the measured speed: the work queued ahead of it (its position
    times the queue's mean work: both backends know the queue's total in O(1)), what the running batches have
    left, and its own."""
    if speed is None:
        return None
    ahead = position * queued_work / depth if depth else 0.0
    return round((ahead + running_left + own_work) * speed, 2)


def running_eta(steps: int, step: int, batch_images: int, speed: float | None) -> float | None:
    """A running job's seconds until it ends: its steps left, for every image of its batch."""
    return None if speed is None else round(max(0, steps - step) * max(1, batch_images) * speed, 2)


def work_left(work: float, steps: int, step: int) -> float:
    """The image-steps a running job (`work` = steps x images) has left."""
    return work * max(0, steps - step) / steps if steps else 0.0


def retry_after_s(queued_work: float, speed: float | None, max_queue: int) -> int:
    """When a full queue likely has room again: the queue's work at the measured speed, per slot."""
    if speed is None:
        return UNKNOWN_RETRY_S
    return int(min(MAX_RETRY_S, max(1, queued_work * speed / max(1, max_queue))))


def deadline(created: float, timeout_s: float | None, cancel_after_s: float | None) -> float | None:
    """A job's deadline (unix time): the sooner of its timeout and when it is no longer wanted (cancel-after)."""
    limits = [limit for limit in (timeout_s, cancel_after_s) if limit]
    return created + min(limits) if limits else None


def past_deadline(cancel_after_s: float | None, created: float, deadline_at: float,
                  status: str) -> tuple[str, str, str]:
    """How a job ends when its deadline passed: (status, error, error kind). Canceled when the deadline was its
    cancel-after (nobody wants it any more: not a failure), else failed with a timeout."""
    if cancel_after_s and abs(created + cancel_after_s - deadline_at) < 1e-3:
        return "canceled", f"canceled: not wanted after {cancel_after_s:g} s (cancel-after)", "canceled"
    return "failed", timed_out(deadline_at - created, status), "timeout"


def timed_out(limit_s: float, status: str) -> str:
    """The error of a job whose timeout passed (`status`: where it was then)."""
    where = "waiting in the queue" if status == "queued" else "waiting and running"
    return f"timed out: its {limit_s:.0f} s limit ({where}) passed"


def given_up(attempts: int) -> str:
    """The error of a job whose worker stopped under it MAX_ATTEMPTS times."""
    return (f"its worker stopped while running this job {attempts} times; giving up (it may crash the worker, "
            "e.g. out of memory)")

