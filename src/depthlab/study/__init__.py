"""Studies: sweeps of training runs over the paper's sparsity knobs, measured, aggregated and reported (SPEC §6).

    from depthlab.study import run_study, write_report
    run_study("depth", "studies/depth-tiny", scale="tiny")
    write_report("studies/depth-tiny")
"""

from __future__ import annotations

from depthlab.lazy import lazy_getattr

_EXPORTS = {
    "StudySpec": "depthlab.study.spec",
    "load_spec": "depthlab.study.spec",
    "builtin_names": "depthlab.study.spec",
    "run_study": "depthlab.study.runner",
    "execute_run": "depthlab.study.runner",
    "study_status": "depthlab.study.runner",
    "aggregate": "depthlab.study.report",
    "write_report": "depthlab.study.report",
    "write_reports": "depthlab.study.report",
    "compare_runs": "depthlab.study.compare",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_getattr(globals(), _EXPORTS)
