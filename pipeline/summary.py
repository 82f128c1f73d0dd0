"""Totals over a raw-shard folder: what ``cm3 ingest`` prints and writes as ingest_summary.json."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cm3.core.shards import complete_shards, read_stats
from cm3.pipeline.image_checks import failure_reason


def summarise(out_dir: Path) -> dict:
    """Sum the per-shard stats of every complete shard; failures are grouped by reason."""
    totals = Counter()
    by_reason: Counter = Counter()
    by_message: Counter = Counter()
    shards = complete_shards(out_dir)
    for shard_id in shards:
        stats = read_stats(out_dir, shard_id)
        for name in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[name] += int(stats.get(name, 0))
        for message, n in stats.get("status_dict", {}).items():
            if message != "success":
                by_reason[failure_reason(message)] += n
                by_message[message] += n
    count = totals["count"]
    return {
        "shards": len(shards),
        "count": count,
        "successes": totals["successes"],
        "success_rate": round(totals["successes"] / count, 4) if count else 0.0,
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "failures_by_reason": dict(by_reason.most_common()),
        "failures_by_message": dict(by_message.most_common(20)),
    }


def format_summary(summary: dict) -> str:
    """A short human-readable block for the terminal."""
    run = summary.get("this_run", {})
    lines = [
        f"shards complete: {summary['shards']}  urls: {summary['count']}  "
        f"downloaded: {summary['successes']} ({100 * summary['success_rate']:.1f}%)",
    ]
    if run:
        lines.append(
            f"this run: {run['shards_written']} shards written, {run['shards_retried']} retried, "
            f"{run['shards_skipped_complete']} already complete, {len(run['shards_failed'])} failed; "
            f"{run['successes']} images in {run['wall_seconds']:.1f} s = {run['images_per_second']:.1f} images/s"
        )
    if summary["failures_by_reason"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in summary["failures_by_reason"].items())
        lines.append(f"failures by reason: {reasons}")
    return "\n".join(lines)
