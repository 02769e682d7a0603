"""Human-readable run summaries (counts only: safe for logs and terminals)."""

from __future__ import annotations

from pacsflow.core.audit import Outcome, RunSummary


def format_summary(summary: RunSummary) -> str:
    outcome = summary.outcomes
    verdict = summary.verdict
    state = verdict.state + (f" at stage {verdict.failed_stage}: {verdict.reason}" if verdict.failed_stage else "")
    lines = [
        f"run {summary.run_key}",
        f"  state          {state}",
        f"  cohort ANs     {summary.cohort}",
        *(f"  {o.value:<14} {outcome.get(o.value, 0)}" for o in Outcome),
        f"  reconciled     {'yes' if summary.reconciled else 'NO'}",
        "  series         " + ", ".join(f"{k} {v}" for k, v in sorted(summary.series.items())),
        f"  instances      {summary.instances}",
        f"  bytes          {summary.bytes} ({summary.bytes / 1e6:.1f} MB)",
    ]
    if summary.reasons:
        lines.append("  failure and filter reasons:")
        lines.extend(f"    {count:>5}  {reason}" for reason, count in sorted(summary.reasons.items()))
    return "\n".join(lines)
