"""Model promotion in the MLflow registry with aliases (stages are deprecated): the version
holding `champion` serves; a newly trained version takes `champion` only when it beats the
current champion on the same held-out evaluation by a margin, else it becomes `challenger`.
Every decision is written as tags on the versions involved, so the registry shows why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    version: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None
    margin: float
    reason: str


def champion(client: Any, name: str) -> Any | None:
    """The version that holds the `champion` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(
    value: float,
    champion_value: float | None,
    margin: float,
    lower_is_better: bool = True,
) -> tuple[bool, str]:
    """Whether a challenger with `value` replaces a champion with `champion_value`: it must
    be better by more than `margin`, a fraction of the champion's value."""
    if champion_value is None:
        return True, "no champion yet"
    gain = (champion_value - value) if lower_is_better else (value - champion_value)
    needed = margin * abs(champion_value)
    if gain > needed:
        return True, f"better by {gain:.4g} (> {needed:.4g} needed)"
    return False, f"not better by the margin: gain {gain:.4g}, needed > {needed:.4g}"


def promote(
    client: Any,
    name: str,
    version: str,
    metric: str,
    value: float,
    champion_value: float | None,
    margin: float = 0.0,
    lower_is_better: bool = True,
) -> Decision:
    """Give `version` the champion alias if it wins (see `decide`), else the challenger
    alias; tag both versions with the decision. `champion_value` is the current champion
    scored on the same held-out data as `value` (None: there is no champion)."""
    current = champion(client, name)
    current_version = str(current.version) if current is not None else None
    if current_version == str(version):
        current_version, champion_value = None, None
    promoted, reason = decide(value, champion_value, margin, lower_is_better)
    client.set_registered_model_alias(name, CHAMPION if promoted else CHALLENGER, str(version))
    decision = Decision(
        promoted=promoted,
        version=str(version),
        metric=metric,
        value=value,
        champion_version=current_version,
        champion_value=champion_value,
        margin=margin,
        reason=reason,
    )
    tags = {
        "attnpipe.decision": "promoted" if promoted else "not promoted",
        "attnpipe.decision_reason": reason,
        f"attnpipe.eval.{metric}": f"{value:.6g}",
    }
    if current_version is not None and champion_value is not None:
        tags["attnpipe.compared_with_version"] = current_version
        tags[f"attnpipe.compared_with.{metric}"] = f"{champion_value:.6g}"
    for key, val in tags.items():
        client.set_model_version_tag(name, str(version), key, val)
    if promoted and current_version is not None:
        client.set_model_version_tag(name, current_version, "attnpipe.replaced_by", str(version))
    return decision


def as_dict(decision: Decision) -> dict[str, Any]:
    return asdict(decision)
