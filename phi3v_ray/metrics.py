"""Evaluation metrics of the recipe (SPEC §5): ANLS, exact-match accuracy, ROC AUC."""

from __future__ import annotations

from typing import Sequence


def clean_prediction(text: str) -> str:
    """The recipe's post-processing: strip whitespace, then periods."""
    return text.strip().strip(".")


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, answers: Sequence[str], tau: float = 0.5, lowercase: bool = True) -> float:
    """Max over references of 1 − NL if NL < tau else 0; an empty prediction scores 0.

    lowercase=True is the official DocVQA scorer; lowercase=False the recipe's case-sensitive form.
    """
    pred = prediction.strip()
    if not pred or not answers:
        return 0.0
    best = 0.0
    for answer in answers:
        ref = answer.strip()
        p, r = (pred.lower(), ref.lower()) if lowercase else (pred, ref)
        nl = levenshtein(p, r) / max(len(p), len(r), 1)
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the cleaned prediction equals any reference, both lowercased."""
    pred = clean_prediction(prediction).lower()
    return float(any(pred == clean_prediction(a).lower() for a in answers))


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    # Rank-sum (Mann–Whitney U) formulation with average ranks for ties.
    ordered = sorted((s, i) for i, s in enumerate(scores))
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][0] == ordered[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ordered[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def summarize(records: Sequence[dict]) -> dict[str, float]:
    """records: {"prediction", "answers", "task", optional "p_yes"} → accuracy, ANLS (both forms), AUC, per task."""
    out: dict[str, float] = {}
    if not records:
        return out
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task") or "all", []).append(r)
    groups = {"": list(records), **({f"{t}/": rs for t, rs in by_task.items()} if len(by_task) > 1 else {})}
    for prefix, rs in groups.items():
        out[f"{prefix}accuracy"] = sum(exact_match(r["prediction"], r["answers"]) for r in rs) / len(rs)
        out[f"{prefix}anls"] = sum(anls_score(r["prediction"], r["answers"]) for r in rs) / len(rs)
        out[f"{prefix}anls_cased"] = sum(anls_score(r["prediction"], r["answers"], lowercase=False) for r in rs) / len(rs)
        yes_no = [r for r in rs if r.get("p_yes") is not None and clean_prediction(r["answers"][0]).lower() in ("yes", "no")]
        if yes_no:
            auc = roc_auc([r["p_yes"] for r in yes_no], [clean_prediction(r["answers"][0]).lower() == "yes" for r in yes_no])
            if auc is not None:
                out[f"{prefix}roc_auc"] = auc
    out["n"] = float(len(records))
    return out


def score_table(columns: dict[str, dict[str, float]], metrics: Sequence[str] = ("accuracy", "anls", "roc_auc")) -> str:
    """Scores as a small table, a row per task ("all" first) and a column per (run tag, metric).

    columns: {"before": summarize(...), "after": summarize(...)}; keys like "accuracy", "digit/accuracy", "n".
    """
    tags = list(columns)
    tasks = sorted({k.split("/")[0] for s in columns.values() for k in s if "/" in k})
    shown = [m for m in metrics if any(m in s or any(k.endswith("/" + m) for k in s) for s in columns.values())]
    head = ["task"] + [f"{m} {t}" if len(tags) > 1 else m for m in shown for t in tags]
    rows = []
    for task in ["all", *tasks]:
        prefix = "" if task == "all" else f"{task}/"
        cells = [f"{columns[t][prefix + m]:.3f}" if prefix + m in columns[t] else "-" for m in shown for t in tags]
        rows.append([task, *cells])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *rows])
