"""Methods that federate exactly through sufficient statistics (AFCL, FeCAM, the joint
reference): each client reports statistics of its current-task data, the server keeps the
latest report per client for the current task (so a repeated round changes nothing) and
folds them into the running totals of earlier tasks when the next task starts.

With every client taking part a task needs one round: `rounds_for_task` says so, and
the bytes columns then count one upload per client per task, which is their real cost.
"""

from __future__ import annotations

import numpy as np

from bench.api import ClientData, ClientUpdate, Message, Server, TaskInfo


def statistics_report(arrays: dict[str, np.ndarray], data: ClientData) -> ClientUpdate:
    """A client's report to a StatisticsServer: its statistics, tagged with the client id the
    server keeps the latest report under."""
    return ClientUpdate(arrays=arrays, meta={"client_id": data.client_id}, num_samples=len(data.y), loss=0.0)


class StatisticsServer(Server):
    """Keeps `totals` (sum over finished tasks and clients) and this task's reports."""

    def setup(self) -> None:
        self.totals: dict[str, np.ndarray] = {}
        self.reports: dict[int, dict[str, np.ndarray]] = {}
        self.pooled: dict[str, np.ndarray] = {}  # totals plus this task's reports, as of the last round
        self.seen = np.zeros(0, dtype=np.int64)

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        return 1 if full_participation else configured

    def begin_task(self, task: TaskInfo) -> None:
        self.totals = self.pooled  # the last round already summed this task's reports in
        self.reports = {}
        self.seen = np.asarray(task.seen_classes, dtype=np.int64)

    def payload_for(self, client_id: int) -> Message:
        return Message()  # nothing to download: clients only report statistics

    def current(self) -> dict[str, np.ndarray]:
        """Totals including this task's latest report of every client."""
        out = {k: v.copy() for k, v in self.totals.items()}
        for arrays in self.reports.values():
            for k, v in arrays.items():
                out[k] = out[k] + v if k in out else v.copy()
        return out

    def aggregate(self, updates: list[ClientUpdate]) -> None:
        for u in updates:
            self.reports[int(u.meta["client_id"])] = u.arrays
        self.pooled = self.current()
        self.refit(self.pooled)

    def refit(self, stats: dict[str, np.ndarray]) -> None:
        """Rebuild the model from the summed statistics."""
        raise NotImplementedError
