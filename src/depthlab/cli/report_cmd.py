"""`depthlab report STUDY_DIR`: one self-contained HTML page and a Markdown summary of a study."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("report", help=help_, description=f"{help_}: the claims the study tests with their verdicts, "
                       "the study table (with the paper's numbers where the setting matches) and its figures. Works "
                       "on unfinished studies too. With several study folders and --combined FILE, also one claims "
                       "table of all of them (e.g. docs/results/README.md).")
    p.add_argument("study_dir", metavar="STUDY_DIR", nargs="+")
    common.add_out(p, "output folder: the report's (one STUDY_DIR) or the parent of one folder per study, named "
                      "like the study folder (several); default STUDY_DIR/report")
    p.add_argument("--combined", default=None, metavar="FILE.md",
                   help="also write the combined claims table of all the studies to this Markdown file")
    p.add_argument("--analysis", default=None, metavar="NAME",
                   help="read each run's analysis from RUN/NAME/results.json instead of RUN/analysis/, e.g. a "
                        "re-analysis on another sample written by 'depthlab analyze RUN --out RUN/NAME' (default "
                        "analysis; the training-dynamics figure is then left out)")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.study.report import write_reports
    from depthlab.study.runner import ANALYSIS_DIR

    for path in write_reports(args.study_dir, args.out, args.combined, ANALYSIS_DIR if args.analysis is None else args.analysis):
        print(f"wrote {path}")
    return 0
