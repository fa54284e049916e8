"""Reports: a self-contained HTML page, Markdown and ``summary.json`` from a tree of runs.

>>> from unbackdoor.report import build_report
>>> summary = build_report("runs/demo")          # writes runs/demo/report.html, report.md, summary.json
"""
from unbackdoor.report.build import ReportOptions, build_report, collect, history_stages, model_row
from unbackdoor.report.runs import DataRun, ModelRun, discover, read_detection

__all__ = ["build_report", "collect", "ReportOptions", "discover", "DataRun", "ModelRun",
"read_detection", "history_stages", "model_row"]
