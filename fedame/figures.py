"""FedAME's own figure for `fedame-bench plot` (FedAME.figures): the expert pool over rounds
and where its expert decisions came from."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.metrics import stats_column
from bench.plot import HATCHES, STYLES, panels


def expert_pool_figure(rounds: pd.DataFrame, decisions: pd.DataFrame | None, method: str) -> dict[str, Figure]:
    """`method`'s experts alive per round (one line per alpha) and its decisions by source and action."""
    rounds = rounds.copy()
    rounds["experts_alive"] = stats_column(rounds, "experts_alive")
    fed = rounds[rounds.experts_alive.notna()]
    if fed.empty:
        return {}
    alphas = sorted(fed.alpha.unique())
    fig, axes = panels(2)
    fed = fed.copy()
    fed["global_round"] = fed.task * (fed.groupby("run_id")["round"].transform("max") + 1) + fed["round"] + 1
    for i, a in enumerate(alphas):
        sel = fed[fed.alpha == a].groupby("global_round").experts_alive.mean()
        mk, ls = STYLES[i % len(STYLES)]
        axes[0].plot(
            sel.index, sel.values, marker=mk, linestyle=ls, color="black", markevery=max(1, len(sel) // 10), label=f"alpha = {a:g}"
        )
    axes[0].set(xlabel="communication round", ylabel="experts alive (count)", title=f"{method} expert pool")
    axes[0].legend()
    if decisions is not None and not decisions.empty:
        counts = decisions.groupby(["source", "action"]).size().unstack(fill_value=0)
        bottom = np.zeros(len(counts))
        for j, action in enumerate(counts.columns):
            axes[1].bar(
                counts.index, counts[action], bottom=bottom, color="white", edgecolor="black", hatch=HATCHES[j % len(HATCHES)], label=action
            )
            bottom += counts[action].to_numpy()
        axes[1].set(xlabel="decision source", ylabel="decisions (count)", title=f"{method} decisions")
        axes[1].legend(fontsize="small")
    return {f"{method}_experts": fig}
