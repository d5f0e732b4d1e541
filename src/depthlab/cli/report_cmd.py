"""`depthlab report STUDY_DIR`: one self-contained HTML page and a Markdown summary of a study."""

from __future__ import annotations


def register(sub, help_: str) -> None:
    p = sub.add_parser("report", help=help_, description=f"{help_}: the study table (with the paper's numbers "
                       "where the setting matches) and its figures. Works on unfinished studies too.")
    p.add_argument("study_dir", metavar="STUDY_DIR")
    p.add_argument("--out", default=None, help="output folder (default STUDY_DIR/report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.study.report import write_report

    html_path, md_path = write_report(args.study_dir, args.out)
    print(f"wrote {html_path}\nwrote {md_path}")
    return 0
