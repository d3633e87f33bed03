"""The champion gate's decision: a pure function of the figures, testable without a registry.

The registry's aliases are named here, once. Lineage (what may be compared): a new version is of the champion's
lineage when the two serve at least one class in common. It is then compared with the champion on the champion's
classes it also serves, with this run's gallery images and test queries of those classes only (:class:`Scores`):
a version retrained on feedback, with more images or new classes, is measured where the champion is. Only a
version that serves none of the champion's classes (another data set) skips the comparison; it still needs its
baselines, and in a shadow or canary rollout it becomes the challenger, never the champion at once.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAMPION, CHALLENGER, PREVIOUS, ENROLLED = "champion", "challenger", "previous", "enrolled"
REJECTED = "rejected"  # a gate decision, not an alias: a loser while a shadow or canary rollout holds 'challenger'


@dataclass(frozen=True)
class Scores:
    """The champion and the new version on the queries both serve: the champion's figure, and the new version's where
    it serves other classes too (``version``; None: its own evaluation figure, on the same classes)."""

    champion: float
    version: float | None = None
    added: tuple[str, ...] = ()  # classes the new version serves and the champion does not
    dropped: tuple[str, ...] = ()  # the champion's classes the new version no longer serves


@dataclass(frozen=True)
class Decision:
    decision: str  # CHAMPION, CHALLENGER or REJECTED
    previous: float | None  # the champion's figure on the shared queries, None when not compared
    reason: str


def decide(champion: str | None, value: float, scores: Scores | None, metric: str, greater_is_better: bool,
           baselines: dict | None, mode: str = "direct") -> Decision:
    """The gate's decision for a new version with ``value`` (its ``metric`` on its own test split) against the
    champion version ``champion`` (None: there is none), scored ``scores`` on the shared queries (None: no class in
    common), given the evaluation's ``baselines`` check and the rollout ``mode`` (direct, shadow, canary)."""
    staged = mode != "direct"
    if baselines is not None and not baselines.get("passed"):
        return Decision(REJECTED if staged else CHALLENGER, None, baselines.get("sentence", "it does not beat its baselines"))
    if champion is None:
        return Decision(CHAMPION, None, f"{metric} {value:.4f}; there was no champion before")
    if scores is None:
        reason = (f"it serves other classes than champion version {champion}, none in common (another data set), so "
                  "the two are not compared; it beats its baselines")
        if not staged:
            return Decision(CHAMPION, None, f"{reason}, and version {champion} stays reachable as 'previous'")
        return Decision(CHALLENGER, None, _staged(reason, mode))
    mine = value if scores.version is None else scores.version
    wins = mine > scores.champion if greater_is_better else mine < scores.champion
    where = "the same test queries and gallery" if scores.version is None else _shared(scores)
    reason = (f"{metric} {mine:.4f} against champion version {champion}'s {scores.champion:.4f} on {where}: "
              f"{'better' if wins else 'not better'}")
    if not wins:
        return Decision(REJECTED if staged else CHALLENGER, scores.champion, reason)
    return Decision(CHALLENGER if staged else CHAMPION, scores.champion, _staged(reason, mode) if staged else reason)


def _shared(scores: Scores) -> str:
    changes = [f"it adds {', '.join(scores.added)}"] if scores.added else []
    changes += [f"it drops {', '.join(scores.dropped)}"] if scores.dropped else []
    return f"the test queries of the classes both serve ({'; '.join(changes)})"


def _staged(reason: str, mode: str) -> str:
    return (f"{reason}; in {mode} rollout: `siamese rollout status` shows its live evidence, "
            "`siamese promote` makes it champion")
