"""The planners' side: read-only reports over the usage table and its rollups.

    filters.py      the filters every report takes (time range, model, category,
                    region, firmware), validated with messages naming the bad field
    privacy.py      k-anonymity and the marketing population
    specs.py        what a report is (`ReportSpec`: measures, chart, options) and
                    what it answers with (`Report`: rows, records, JSON)
    query.py        what every report's SQL runs through: the filtered rows or
                    device-days before it, its records split into segments
    reports.py      the eight reports: their SQL, and the registry `REPORTS`
    runner.py       `run_report`: options checked, the SQL run read-only, database
                    errors translated, small segments merged or suppressed
    generalise.py   segments below k merged along a hierarchy until a group reaches
                    k, or else suppressed; exact numbers for the merged rows
    hierarchies.py  each report's hierarchy, and how its merged numbers are computed
    export.py       a report as CSV, Parquet or JSON
    charts.py       a report as a PNG or SVG chart (matplotlib, Agg)
    api.py          the read-only HTTP API and the web page (`static/index.html`)
    cli.py          `usagepipe report ...` and `usagepipe insights serve`
    dp.py           differentially private releases: each owner bounded, OpenDP's
                    noise and threshold, the epsilon each release states
    dp_ledger.py    a private release made once and replayed, each planner's budget
    dp_api.py       `GET /api/dp/reports/{name}`, `GET /api/dp/budget`
    dp_cli.py       `usagepipe report NAME --dp`

Nothing here writes to the database but the private releases' ledger
(`<table>_dp_releases`, `<table>_dp_spend`, by `dp_ledger.py` alone), and no result
carries a device id, an owner key, or anything from the registry's owners beyond the
population rule.
"""
