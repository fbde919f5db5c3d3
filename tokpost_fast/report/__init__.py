"""Reports: what the metrics measured, written for people.

    table.py     the printed table of `python -m tokpost_fast.evaluate` (format_table of a metrics.json dict)
    pipeline.py  the demo pipeline's RUN/report.md + report.json + PNGs (write_report), from what the stages and
                 the evaluate stage (metrics/arms.py) left in the run folder

Above the stages and the metrics (it reads their outputs), below the entry points (evaluate.py, pipeline.py).
"""

from tokpost_fast.report.pipeline import write_report
from tokpost_fast.report.table import format_table, pfid_label

__all__ = ["format_table", "pfid_label", "write_report"]
