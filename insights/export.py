"""A report as a file: CSV, Parquet or JSON.

Every format holds the same flat rows (`Report.records()`): the segment's dimensions,
the measures (empty / null where the segment is suppressed), `suppressed`,
`suppressed_reason` and `generalised` (null for a fine segment, else what was merged).
A generalised row's merged dimensions hold labels ("all versions", "0-5 (night)"), so a
dimension is an integer column only while every value in it is a whole number, and a
string column (numbers written as text) once a label is among them. JSON rows also
carry `members`, the fine segments a merged row holds. Parquet columns are typed from
the report's definition, and the file's metadata records the report, its filters and
k; the CSV is plain RFC 4180.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from insights.generalise import Scalar
from insights.specs import Report

Format = Literal["csv", "parquet", "json"]
FORMATS: tuple[Format, ...] = ("csv", "parquet", "json")
MEDIA_TYPES: dict[Format, str] = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "json": "application/json",
}


def to_csv(report: Report) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=report.columns, lineterminator="\r\n")
    writer.writeheader()
    for record in report.records():
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return out.getvalue().encode()


def to_parquet(report: Report) -> bytes:
    records = report.records()
    arrays = {}
    fields = []
    for name in report.columns:
        values = [r[name] for r in records]
        kind = _arrow_type(report, name, values)
        if kind == pa.string():
            values = [None if v is None else str(v) for v in values]
        fields.append(pa.field(name, kind))
        arrays[name] = pa.array(values, type=kind)
    metadata = {
        b"usagepipe.report": report.spec.name.encode(),
        b"usagepipe.filters": json.dumps(report.filters.describe()).encode(),
        b"usagepipe.options": json.dumps(report.options).encode(),
        b"usagepipe.k_anonymity": str(report.k).encode(),
    }
    table = pa.Table.from_pydict(arrays, schema=pa.schema(fields, metadata=metadata))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _arrow_type(report: Report, name: str, values: Sequence[Scalar]) -> pa.DataType:
    measure = report.spec.measures.get(name)
    if measure == "int":
        return pa.int64()
    if measure == "float":
        return pa.float64()
    if name == "suppressed":
        return pa.bool_()
    if (
        name in report.spec.dimensions
        and all(isinstance(v, int) for v in values if v is not None)
        and any(v is not None for v in values)
    ):
        return pa.int64()  # integer dimensions (hour, day_of_week, cycles) without labels
    return pa.string()


def to_json(report: Report) -> bytes:
    return json.dumps(report.describe(), ensure_ascii=False, indent=1).encode()


def export(report: Report, fmt: Format) -> bytes:
    """`report` in format `fmt`."""
    if fmt == "csv":
        return to_csv(report)
    if fmt == "parquet":
        return to_parquet(report)
    return to_json(report)
