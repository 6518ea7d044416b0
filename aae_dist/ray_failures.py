"""Which worker failures Ray Train retries: a process or node lost (SIGKILL, OOM, a dead node) is
retried from the last checkpoint; a mistake the user must fix (a `UserError` raised by any worker:
corrupt shard, non-finite loss with nan_policy=stop, incompatible checkpoint) ends the run at once,
since a retry would only fail the same way.

Ray Train 2.60 takes its failure policy from an internal factory with no public hook, so the driver
swaps the factory for the duration of one `fit()` (`user_errors_are_final`); should Ray move it, the
swap is skipped and Ray's default policy (retry everything) applies."""

from __future__ import annotations

import contextlib

from .errors import UserError

USER_ERROR_MARK = "UserError: "


def is_user_error(exc: BaseException | None) -> bool:
    """A UserError itself, or a Ray error that carries one (as a cause or in its text)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, UserError) or USER_ERROR_MARK in str(exc):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


def _policy_class():
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class UserErrorsAreFinal(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if isinstance(training_failed_error, WorkerGroupError) and any(
                is_user_error(e) for e in training_failed_error.worker_failures.values()
            ):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorsAreFinal


@contextlib.contextmanager
def user_errors_are_final():
    try:
        import ray.train.v2.api.data_parallel_trainer as dpt

        original = dpt.create_failure_policy
        policy = _policy_class()
    except (ImportError, AttributeError):  # a Ray without this internal: keep its default policy
        yield
        return
    dpt.create_failure_policy = lambda failure_config: policy(failure_config)
    try:
        yield
    finally:
        dpt.create_failure_policy = original
