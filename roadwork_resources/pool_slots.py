"""Pool slots held by dead runs: find them, mark the runs failed, free the slots.

A run frees its pool slots when its steps end. A process killed with SIGKILL (the OOM killer, a
reboot, `kill -9`) frees nothing: its run stays STARTED and keeps its slot of pool `gpu`, and every
later training step on the instance waits for ever ("Step blocked by limit for pool gpu"). Dagster's
run monitoring asks the run launcher whether a run's worker is alive, but the default launcher (and
a CLI `dagster asset materialize`, which has none) cannot tell, so roadwork checks the processes here:

- every run that uses `GPUResource` calls `free_slots_of_dead_runs` when its resources start, before
  its first step claims a slot (the CLI path, no daemon needed);
- the `dead_run_slot_reaper` sensor calls it every 20 s while the daemon runs (`make ui`, `dagster
  dev`); run monitoring in dagster.yaml then frees whatever a finished run still holds;
- `python -m roadwork_resources.pool_slots` lists the holders; `--free RUN_ID` frees one by hand.

A STARTED run of this host whose processes are gone is marked FAILURE the same way, slot or none (killed
in a step that takes no slot, it stayed STARTED for ever).

A run is dead when it ran on this host (tag `roadwork/host`, set by `GPUResource`) and none of the
processes its event log names (the `pid` of its engine events) is alive; a pid now used by a process
started later does not count. A run of another host is never guessed dead: the listing names it and
the command that frees it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
import psutil

HOST_TAG = "roadwork/host"
FREE_COMMAND = "python -m roadwork_resources.pool_slots --free {run_id}"
_PID_EVENTS = {dg.DagsterEventType.ENGINE_EVENT, dg.DagsterEventType.STEP_WORKER_STARTED}


@dataclass
class SlotHolder:
    """A run that holds (or waits for) slots of some pools, and what is known of its processes."""

    run_id: str
    pools: list[str]
    state: str  # alive | dead | finished | missing | unknown
    detail: str
    pids: list[int] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        """Its slots can be freed without asking anyone: nothing of the run is left to use them."""
        return self.state in ("dead", "finished", "missing")


def this_host() -> str:
    return socket.gethostname()


def _run_pids(instance: dg.DagsterInstance, run_id: str) -> dict[int, float]:
    """pid -> timestamp of the first event that names it (the run's and its step workers' processes)."""
    pids: dict[int, float] = {}
    for entry in instance.all_logs(run_id, of_type=_PID_EVENTS):
        data = entry.dagster_event.event_specific_data if entry.dagster_event else None
        pid = (getattr(data, "metadata", None) or {}).get("pid")
        if pid is not None and str(pid.value).isdigit():
            pids.setdefault(int(pid.value), entry.timestamp)
    return pids


def _alive(pid: int, named_at: float) -> bool:
    """The process named at `named_at` still runs (not a zombie, not a later process with its pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= named_at + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _judge(instance: dg.DagsterInstance, run_id: str, pools: list[str]) -> SlotHolder:
    run = instance.get_run_by_id(run_id)
    if run is None:
        return SlotHolder(run_id, pools, "missing", "the run no longer exists in this instance")
    if run.is_finished:
        return SlotHolder(run_id, pools, "finished", f"the run ended {run.status.value}")
    host = run.tags.get(HOST_TAG)
    pids = _run_pids(instance, run_id)
    if host != this_host() or not pids:
        where = f"host {host!r}" if host else "an unknown host"
        return SlotHolder(run_id, pools, "unknown", f"{run.status.value} on {where}", sorted(pids))
    live = [pid for pid, named_at in pids.items() if _alive(pid, named_at)]
    if live:
        return SlotHolder(run_id, pools, "alive", f"{run.status.value}, process {live} running", sorted(pids))
    gone = ", ".join(str(p) for p in sorted(pids))
    detail = f"{run.status.value} but its process (pid {gone}) is gone: killed or crashed"
    return SlotHolder(run_id, pools, "dead", detail, sorted(pids))


def slot_holders(instance: dg.DagsterInstance, exclude_run_id: str | None = None) -> list[SlotHolder]:
    """Every run that holds or waits for a pool slot, judged; `exclude_run_id` (the caller) skipped."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return []
    pools_of: dict[str, set[str]] = {}
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        for holder in [*info.claimed_slots, *info.pending_steps]:
            pools_of.setdefault(holder.run_id, set()).add(pool)
    holders = [
        _judge(instance, run_id, sorted(pools))
        for run_id, pools in pools_of.items()
        if run_id != exclude_run_id
    ]
    return holders + _dead_started_runs(instance, exclude={exclude_run_id, *pools_of})


def _dead_started_runs(instance: dg.DagsterInstance, exclude: set) -> list[SlotHolder]:
    """STARTED runs of this host that hold no slot and whose processes are gone: a run killed outside a
    training step (in `evaluation_report`, say) stayed STARTED for ever, and its MLflow run with it (the
    daemon's `mlflow_failed_run_closer` acts on failed runs only). Runs of other hosts are not judged."""
    found = []
    for run in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=200):
        if run.run_id in exclude or run.tags.get(HOST_TAG) != this_host():
            continue
        judged = _judge(instance, run.run_id, [])
        if judged.state == "dead":
            found.append(judged)
    return found


def free_run(instance: dg.DagsterInstance, run_id: str, reason: str) -> None:
    """Mark the run FAILURE with `reason` (unless it already ended) and free all its pool slots."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_failed(run, reason)
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def free_slots_of_dead_runs(
    instance: dg.DagsterInstance,
    freed_by: str,
    log: Callable[[str], None] | None = None,
    exclude_run_id: str | None = None,
) -> list[SlotHolder]:
    """Free the slots of every stale holder (dead, finished or deleted run); return those freed.

    `log` gets one line per freed run and one per run whose state cannot be known here, naming the
    command that frees it.
    """
    freed = []
    for holder in slot_holders(instance, exclude_run_id):
        pools = ", ".join(holder.pools)
        if holder.stale:
            what = f"freed its slots in pool {pools}" if holder.pools else "marked FAILURE (it held no slot)"
            free_run(instance, holder.run_id, f"{freed_by}: {holder.detail}; {what}")
            freed.append(holder)
            if log and not holder.pools:
                log(f"freed run {holder.run_id}: marked FAILURE ({holder.detail}); it held no pool slot")
            elif log:
                resume = (
                    "; its training steps resume from their last checkpoint" if holder.state == "dead" else ""
                )
                log(f"freed the slots in pool {pools} held by run {holder.run_id} ({holder.detail}){resume}")
        elif holder.state == "unknown" and log:
            log(
                f"run {holder.run_id} holds slots in pool {pools} ({holder.detail}); its processes cannot be "
                f"checked from {this_host()}. If it is dead, free them: "
                + FREE_COMMAND.format(run_id=holder.run_id)
            )
    return freed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m roadwork_resources.pool_slots",
        description="List the runs holding pool slots in $DAGSTER_HOME's instance; free the stale ones.",
    )
    parser.add_argument("--free", metavar="RUN_ID", help="mark this run failed and free its slots")
    parser.add_argument("--free-dead", action="store_true", help="free every dead or finished holder")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        if args.free:
            free_run(instance, args.free, f"freed by hand ({parser.prog} --free) from {this_host()}")
            print(f"run {args.free}: marked failed (if it was still running) and its pool slots freed")
            return 0
        if args.free_dead:
            free_slots_of_dead_runs(instance, f"{parser.prog} --free-dead", log=print)
            return 0
        holders = slot_holders(instance)
        for h in holders:
            print(f"{h.run_id}  pools={','.join(h.pools)}  {h.state}: {h.detail}")
        if not holders:
            print("no run holds a pool slot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
