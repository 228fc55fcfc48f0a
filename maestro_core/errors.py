"""One exception hierarchy for the whole project.

- ConfigError: the user's mistake (a registry, a config, a dataset); the message names the
  file, the entry, the field and the fix. Retrying cannot help.
- ModelBehaviorError: the policy wrote something the protocol does not accept. It never
  crashes an episode: the runner shows it to the policy as an error observation.
- ExpertError: an expert failed (timeout, HTTP status, bad reply). Some are retryable.
  ExpertUnavailable: its circuit breaker is open, the call failed fast.
- StorageError: the store or the object store failed, or its schema does not match.
- SandboxError: code execution could not be set up (not: the code failed; that is a result).
"""

from __future__ import annotations


class MaestroError(Exception):
    """Base class of every error Maestro raises on purpose."""


class ConfigError(MaestroError, ValueError):
    """A registry, config or dataset is invalid. The message says where and how to fix it."""

    def __init__(self, message: str, *, source: str | None = None, entry: str | None = None,
                 field: str | None = None, fix: str | None = None):
        self.source, self.entry, self.field, self.fix = source, entry, field, fix
        parts = []
        if source:
            parts.append(str(source))
        if entry:
            parts.append(f"entry '{entry}'")
        if field:
            parts.append(f"field '{field}'")
        where = ": ".join([", ".join(parts)]) if parts else ""
        text = f"{where}: {message}" if where else message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


class ModelBehaviorError(MaestroError):
    """The policy's output broke the action protocol. Shown to the policy, never raised out
    of an episode."""

    kind = "model_behavior"


class MalformedAction(ModelBehaviorError):
    """No action, unbalanced tags, text outside the tags, or an empty call."""

    kind = "malformed"


class MultipleActions(ModelBehaviorError):
    """More than one <call>/<answer> in one turn."""

    kind = "multiple_actions"


class UnknownExpert(ModelBehaviorError):
    kind = "unknown_expert"


class UnknownSkill(ModelBehaviorError):
    kind = "unknown_skill"


class UnknownSolver(ModelBehaviorError):
    kind = "unknown_solver"


class IncompatiblePair(ModelBehaviorError):
    """The expert lacks a capability the skill or solver needs."""

    kind = "incompatible_pair"


class ExpertError(MaestroError):
    """An expert call failed. `retryable` says whether trying again may help."""

    retryable = False

    def __init__(self, message: str, *, expert: str | None = None):
        self.expert = expert
        super().__init__(f"expert '{expert}': {message}" if expert else message)


class ExpertTimeout(ExpertError):
    retryable = True


class ExpertHTTPError(ExpertError):
    """A non-2xx answer. 429 and 5xx are retryable, other 4xx are not."""

    def __init__(self, message: str, *, status: int, expert: str | None = None):
        self.status = status
        self.retryable = status == 429 or status >= 500
        super().__init__(f"HTTP {status}: {message}", expert=expert)


class ExpertReplyError(ExpertError):
    """The expert answered, but not in a form we can read (malformed JSON, no choices)."""


class ExpertUnavailable(ExpertError):
    """The expert's circuit breaker is open: the call failed fast, the expert was not contacted.
    `retry_in_s` says when a trial call will be let through (see maestro_core.breaker)."""

    def __init__(self, message: str, *, expert: str | None = None, retry_in_s: float = 0.0):
        self.retry_in_s = retry_in_s
        super().__init__(message, expert=expert)


class BudgetExceeded(MaestroError):
    """The episode's cost budget is spent; further calls are refused."""


class StorageError(MaestroError):
    """The DuckDB store or the object store failed."""


class SchemaMismatch(StorageError):
    """The store on disk was written by another schema version."""


class SandboxError(MaestroError):
    """The code sandbox could not be set up (missing user, unshare not permitted...)."""
