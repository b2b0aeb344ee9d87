"""The e2e benchmark's one table, rendered from its JSON document (`bench/e2e.py`)."""

from __future__ import annotations

import math
from typing import Any


def _n(value: Any, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:,.2f}{unit}"
    return f"{value:,.0f}{unit}"


def _ms(seconds: Any) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1000:,.0f} ms"


def rows(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, note) lines, in the order of the table."""
    out: list[tuple[str, str, str]] = []
    add = out.append
    mix = f"simulator payloads, {doc.get('mix', 'uniform')} schema mix"
    add(("message size (mean)", _n(doc.get("message_bytes_mean"), " B"), mix))
    if relay := doc.get("raw_mqtt_relay"):
        add(("raw: paho -> mosquitto -> paho, QoS 1", _n(relay["msg_s"], " msg/s"),
             f"{relay['publishers']} paho publishers sent {_n(relay['publish_msg_s'])} msg/s,"
             f" CPU share {relay['publisher_cpu_share']}"))  # fmt: skip
    if produce := doc.get("raw_kafka_produce"):
        add(("raw: aiokafka produce, acks=all", _n(produce["msg_s"], " msg/s"), "pipelined"))
    if copy := doc.get("raw_pg_copy"):
        add(("raw: asyncpg COPY into usage table", _n(copy["msg_s"], " rows/s"),
             f"batches of {copy['batch']:,}"))  # fmt: skip
    if p := doc.get("pipeline"):
        shape = f"{p['bridges']} bridge, {p['consumers']} consumer, {p['publishers']} publishers"
        add(("pipeline: sustained, msg -> row", _n(p["sustained_msg_s"], " msg/s"),
             f"{shape}; {p['unique']:,} unique msgs; limited by {p['limited_by']}"))  # fmt: skip
        add(("pipeline: steady (20-80 % of rows)", _n(p["steady_20_80_msg_s"], " msg/s"),
             f"fleet published at {_n(p['publish_msg_s'])} msg/s, publisher CPU share"
             f" {p['publisher_cpu_share']}; last row {p['rows_done_after_last_puback_s']:.1f}s"
             " after last PUBACK"))  # fmt: skip
        holes = p.get("consumer_offset_holes", {})
        add(("pipeline: consumer batches", _n(p.get("consumer_mean_batch_records"), " rec"),
             f"mean per batch, {_ms(p.get('consumer_mean_batch_s'))} each,"
             f" {p.get('consumer_batches', 0):,.0f} batches; offset holes read again"
             f" {holes.get('read_again', 0):.0f}, read past"
             f" {holes.get('read_past', 0):.0f}"))  # fmt: skip
        if stages := p.get("consumer_mean_stage_s"):
            add(("pipeline: consumer batch stages", "", ", ".join(
                f"{k} {_ms(v)}" for k, v in stages.items())))  # fmt: skip
        add(("pipeline: servers' CPU (cores)", "", ", ".join(
            f"{k} {v:.2f}" for k, v in p.get("servers_cpu_share", {}).items())))  # fmt: skip
        for side in ("bridge", "consumer"):
            u = p[side]
            add((f"pipeline: {side} CPU per 1,000 msgs", _n(u["cpu_s_per_1000"] * 1000, " ms"),
                 f"peak RSS {u['peak_rss_mb']:.0f} MB"))  # fmt: skip
    if v := doc.get("verify"):
        t = v["table"]
        stored, dup = t.get("stored", {}), t.get("duplicate", {})
        add(("ledger verify (0 lost, 0 duplicated)", "OK" if v["ok"] else "FAILED",
             f"stored {stored.get('found', 0):,}/{stored.get('expected', 0):,}, duplicates"
             f" dropped {dup.get('found', 0):,}/{dup.get('expected', 0):,},"
             f" discrepancies {v['discrepancies']}"))  # fmt: skip
    for share in (50, 90):
        if lat := doc.get(f"latency_{share}"):
            add((f"latency at {share} %: p50 / p99", f"{_ms(lat['p50_s'])} / {_ms(lat['p99_s'])}",
                 f"{_n(lat['achieved_msg_s'])} msg/s sent ({_n(lat['target_msg_s'])} asked),"
                 f" {lat['samples']:,} samples, max {_ms(lat['max_s'])}, poll"
                 f" {_ms(lat['poll_interval_s'])}; of which publish -> Kafka p50/p99"
                 f" {_ms(lat.get('to_kafka_p50_s'))} / {_ms(lat.get('to_kafka_p99_s'))};"
                 f" consumer batches {_n(lat.get('consumer_mean_batch_records'))} rec in"
                 f" {_ms(lat.get('consumer_mean_batch_s'))}"))  # fmt: skip
            if stages := lat.get("consumer_mean_stage_s"):
                add((f"latency at {share} %: consumer batch", "", ", ".join(
                    f"{k} {_ms(v)}" for k, v in stages.items())))  # fmt: skip
            if "rollup_refreshes" in lat:
                add((f"latency at {share} %: rollup refreshes", f"{lat['rollup_refreshes']:.0f}",
                     f"{_ms(lat['rollup_refresh_s'])} in all, of those that ended in the"
                     " phase"))  # fmt: skip
    for phase in ("live", "drain"):
        for kind in ("usagepipe", "mq-bridge"):
            f = doc.get(f"{phase}_{kind}")
            if not f:
                continue
            note = (f"CPU {_n(f['cpu_s_per_1000'] * 1000)} ms/1,000, peak RSS"
                    f" {f['peak_rss_mb']:.0f} MB, {f['records']:,} records, missing"
                    f" {f['missing']}, duplicates {f['duplicates']}")  # fmt: skip
            if phase == "live":
                note += f"; fleet {_n(f['publish_msg_s'])} msg/s, {f['limited_by']}-limited"
            else:
                note += f"; {_n(f['from_process_start_msg_s'])} msg/s from process start"
            add((f"bridge {phase}: {kind}", _n(f["msg_s"], " msg/s"), note))
    peer = doc.get("peer", {})
    if not peer.get("available", True):
        add(("peer mq-bridge", "not run", peer.get("status", "")))
    r = doc.get("ratios", {})
    if "pipeline_vs_slowest_raw" in r:
        add(("ratio: pipeline / slowest raw stage", _n(r["pipeline_vs_slowest_raw"]),
             f"slowest: {r['slowest_raw_stage']}"))  # fmt: skip
    for phase in ("drain", "live"):
        if f"{phase}_rate_ours_vs_mq_bridge" in r:
            cpu = _n(r[f"{phase}_cpu_per_msg_ours_vs_mq_bridge"])
            rate = _n(r[f"{phase}_rate_ours_vs_mq_bridge"])
            note = f"CPU per msg ours / peer {cpu}"
            ours, peer = doc.get(f"{phase}_usagepipe", {}), doc.get(f"{phase}_mq-bridge", {})
            if ours.get("limited_by") == peer.get("limited_by") == "load":
                note += "; both load-limited: the rates compare the load, not the bridges"
            add((f"ratio: {phase} rate, ours / mq-bridge", rate, note))
    return out


def render(doc: dict[str, Any]) -> str:
    lines = rows(doc)
    w1 = max(len(a) for a, _, _ in lines)
    w2 = max(len(b) for _, b, _ in lines)
    head = f"usagepipe e2e benchmark, run {doc.get('run')} at {doc.get('when')}, " + (
        f"{doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}"
    )
    rule = "-" * min(160, w1 + w2 + 60)
    body = [f"{a:<{w1}}  {b:>{w2}}  {c}" for a, b, c in lines]
    return "\n".join([head, rule, *body, rule])
