"""Where replicas run on one machine. Pure decisions, unit-tested without hardware."""

from __future__ import annotations


def cpu_thread_binds(tp_sizes: list[int], cores: list[int]) -> list[str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for each CPU replica: disjoint cores, ``|`` between TP ranks.

    Several vLLM CPU engines whose OpenMP threads share cores stall each other
    (a thread spins at a barrier while its peer is descheduled), so each rank
    gets cores of its own. None (vLLM's own "auto") where there is only one rank
    or fewer cores than ranks.
    """
    ranks = sum(tp_sizes)
    if ranks <= 1 or len(cores) < ranks:
        return [None] * len(tp_sizes)
    per_rank = len(cores) // ranks
    binds: list[str | None] = []
    next_core = 0
    for tp in tp_sizes:
        groups = []
        for _ in range(tp):
            groups.append(",".join(str(c) for c in cores[next_core : next_core + per_rank]))
            next_core += per_rank
        binds.append("|".join(groups))
    return binds
