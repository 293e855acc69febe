"""What one benchmark run records: its phases, in seconds, or its failure."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["COLD_PHASES", "WARM_PHASES", "RunSample"]

#: Phases of a cold (burst, staggered) run, in the order they happen.
COLD_PHASES = ("provision", "ready", "inject", "first_msg", "first_asst", "result", "teardown")
#: Phases of a warm run: ``acquire`` (take a ready sandbox) replaces provision and ready.
WARM_PHASES = ("acquire", "inject", "first_msg", "first_asst", "result", "teardown")


@dataclass
class RunSample:
    """One measured run: phase durations in seconds, or the failure.

    Attributes:
        provider: The provider's name in the report.
        phases: Seconds per phase (all of them when the run succeeded).
        model_s: The model's own time (the result's ``duration_api_ms``).
        agent_first_msg_s: The agent's own prompt → first message, measured in the sandbox.
        error: Why the run failed; ``None`` if it did not.
        launch_index: In a burst or staggered round, the run's place in the launch order.
        launch_offset_s: In a burst or staggered round, seconds from the round's first
            launch to this run's, as measured.
    """

    provider: str
    phases: dict[str, float] = field(default_factory=dict)
    model_s: float | None = None
    agent_first_msg_s: float | None = None
    error: str | None = None
    launch_index: int | None = None
    launch_offset_s: float | None = None

    @property
    def total(self) -> float:
        """Seconds, all phases together."""
        return sum(self.phases.values())
