"""The report of a chaos run: one JSON document, and the text table made from it.

Time without service of a fault: the client's outages (demo.client.outages: from the first
failed request after a success to the next acknowledged one) that overlap the time from the
moment the fault was applied to the end of the settle period after the cluster was stable
again, added up. Reintegration: from the (last) heal to the start of that stable period, i.e.
until one node was PRIM/ALONE Ready and the other SECOND Ready. Faults that ran as an
overlapping pair are counted in their own row, not in their classes' figures.
"""

from __future__ import annotations

import math

from demo import client as C

SETTLE_S = 1.5


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[max(math.ceil(q * len(v)) - 1, 0)]


def spread(values: list[float]) -> dict:
    return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "max": max(values) if values else None}


def outage_of(window: tuple[float, float], outages: list[tuple[float, float]]) -> float:
    """The outages that overlap the window, whole: one that began with a request sent just
    before the fault counts. Client segments end at every check, so an outage never spans
    two faults."""
    start, end = window
    return sum(e - s for s, e in outages if s <= end and e >= start)


def build(*, opts, schedule, faults, checks, problems, error, writer_entries, segments,
          crashes, mutator, last, elapsed, environment) -> dict:
    outages = []
    for _, entries in segments:
        outages += C.outages(entries, include_open=True)
    pairs: dict[int, list[dict]] = {}
    for f in faults:
        if f["applied"] is None:
            continue
        first = min((g["applied"] for g in faults if g["index"] == f["index"]
                     and g["applied"] is not None), default=f["applied"])
        end = (f["stable"] + SETTLE_S) if f.get("stable") else float("inf")
        f["outage_s"] = outage_of((first, end), outages)
        if f["overlapping"]:
            pairs.setdefault(f["index"], []).append(f)
    rows: dict[str, dict] = {}
    applied = [f for f in faults if f["applied"] is not None and not f["skipped"]]
    for f in applied:
        if f["overlapping"]:
            continue
        r = rows.setdefault(f["key"], {"count": 0, "outage": [], "reintegration": []})
        r["count"] += 1
        r["outage"].append(f["outage_s"])
        if f["reintegration_s"] is not None:
            r["reintegration"].append(f["reintegration_s"])
    pair_rows = {"count": 0, "outage": [], "reintegration": []}
    for index, fs in pairs.items():
        fs = [f for f in fs if not f["skipped"]]
        if not fs:
            continue
        pair_rows["count"] += 1
        pair_rows["outage"].append(fs[0]["outage_s"])
        if fs[0]["reintegration_s"] is not None:
            pair_rows["reintegration"].append(fs[0]["reintegration_s"])
    by_class: dict[str, int] = {}
    for f in applied:
        by_class[f["key"]] = by_class.get(f["key"], 0) + 1
    writer = (last or {}).get("writer", {})
    client = (last or {}).get("client", {})
    errors: dict[str, int] = {}
    for e in writer_entries:
        if "error" in e:
            errors[e["error"]] = errors.get(e["error"], 0) + 1
    lost = writer.get("lost_count", 0) + client.get("lost_count", 0)
    dual = len(writer.get("dual_writer_windows", []))
    final_done = any(ch["label"].startswith("final") for ch in checks)
    failed_checks = [ch for ch in checks if not ch["ok"]]
    passed = (error is None and not problems and lost == 0 and dual == 0 and final_done
              and not failed_checks)
    result = {
        "seed": opts.seed, "minutes": opts.minutes, "elapsed_s": elapsed,
        "classes": list(opts.classes), "environment": environment,
        "options": {"disk_full_tmpfs": opts.disk, "corrupting_proxy": opts.proxy,
                    "app_checker": opts.checker},
        "passed": passed, "error": error, "problems": problems,
        "schedule": [f.to_json() for f in schedule],
        "faults_run": len({f["index"] for f in applied}),
        "faults_by_class": dict(sorted(by_class.items())),
        "faults": faults,
        "per_class": {k: {"count": r["count"], "time_without_service_s": spread(r["outage"]),
                          "reintegration_s": spread(r["reintegration"])}
                      for k, r in sorted(rows.items())},
        "overlapping_pairs": {"count": pair_rows["count"],
                              "time_without_service_s": spread(pair_rows["outage"]),
                              "reintegration_s": spread(pair_rows["reintegration"])},
        "all_faults": {"time_without_service_s": spread(
            [f["outage_s"] for f in applied if not f["second"]]),
            "reintegration_s": spread([f["reintegration_s"] for f in applied
                                       if not f["second"] and f["reintegration_s"] is not None])},
        "acknowledged": {"writer": writer.get("acked", 0), "writer_by_node":
                         writer.get("by_node", {}), "client": client.get("acked", 0)},
        "lost": {"total": lost, "writer": writer.get("lost_count", 0),
                 "client": client.get("lost_count", 0)},
        "only_in_quarantine": {"writer": writer.get("quarantined_count", 0),
                               "client": client.get("quarantined_count", 0)},
        "dual_writer_windows": writer.get("dual_writer_windows", []),
        "late_acknowledgements": {"count": writer.get("late_acknowledgements", 0),
                                  "longest_s": writer.get("longest_late_s", 0.0)},
        "order_violations": writer.get("order_violations", []),
        "checks": {"run": len(checks), "failed": len(failed_checks),
                   "verify_clean": sum(1 for ch in checks if ch.get("verify") == []),
                   "integrity_ok": sum(1 for ch in checks if ch.get("integrity") == ["ok"]),
                   "details": checks},
        "controller_crashes": crashes,
        "needed_admin": len({f["index"] for f in faults if f.get("remedy")}),
        "writer_refusals": dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        "mutator": mutator,
        "client_outages": [{"start": s, "end": e, "s": e - s} for s, e in outages],
    }
    result["text"] = text(result)
    return result


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _s(d: dict) -> str:
    return f"{_f(d['p50'])} / {_f(d['p99'])} / {_f(d['max'])}"


def text(r: dict) -> str:
    env = r["environment"]
    lines = [f"fusemirror chaos run: seed {r['seed']}, {r['minutes']:g} min asked, "
             f"{r['elapsed_s']:.0f} s in all; {env['cpus']} CPUs, kernel "
             f"{env['kernel']}, Python {env['python']}, {env['started']}",
             "module: lease witness, " + ("an http checker on the application's /ready"
                                          if r["options"]["app_checker"] else "no checker")
             + (", folders on 128 MiB tmpfs" if r["options"]["disk_full_tmpfs"] else "")
             + (", replication through a corrupting proxy" if r["options"]["corrupting_proxy"]
                else ""),
             f"faults run: {r['faults_run']} of {len(r['schedule'])} drawn "
             f"({r['overlapping_pairs']['count']} with an overlapping second fault); "
             f"replay: --seed {r['seed']} --minutes {r['minutes']:g}", "",
             f"{'fault class@role':<32} {'n':>3}   {'no service s p50/p99/max':<26} "
             f"{'reintegration s p50/p99/max':<28}"]
    for key, row in r["per_class"].items():
        lines.append(f"{key:<32} {row['count']:>3}   {_s(row['time_without_service_s']):<26} "
                     f"{_s(row['reintegration_s']):<28}")
    p = r["overlapping_pairs"]
    if p["count"]:
        lines.append(f"{'(overlapping pairs)':<32} {p['count']:>3}   "
                     f"{_s(p['time_without_service_s']):<26} {_s(p['reintegration_s']):<28}")
    a = r["all_faults"]
    lines.append(f"{'all faults':<32} {r['faults_run']:>3}   "
                 f"{_s(a['time_without_service_s']):<26} {_s(a['reintegration_s']):<28}")
    ack = r["acknowledged"]
    by_node = ", ".join(f"{n} {k}" for n, k in sorted(ack["writer_by_node"].items()))
    q = r["only_in_quarantine"]
    late = r["late_acknowledgements"]
    ch = r["checks"]
    lines += ["",
              f"acknowledged writes: writer {ack['writer']} ({by_node}); client requests "
              f"through the VIP {ack['client']}",
              f"lost writes: {r['lost']['total']} (writer {r['lost']['writer']}, client "
              f"{r['lost']['client']}); only in quarantine: writer {q['writer']}, client "
              f"{q['client']}",
              f"dual-writer windows: {len(r['dual_writer_windows'])} (late acknowledgements "
              f"excused: {late['count']}, longest {late['longest_s']:.2f} s); order "
              f"violations: {len(r['order_violations'])}",
              f"checks: {ch['run']} run, {ch['failed']} failed; verify clean {ch['verify_clean']}"
              f", integrity_check ok {ch['integrity_ok']}",
              f"controllers that exited by themselves (restarted like systemd would): "
              f"{len(r['controller_crashes'])}; faults after which the cluster needed the "
              f"admin: {r['needed_admin']}",
              "writer attempts refused: " + (", ".join(f"{k} {v}" for k, v in
                                                       r["writer_refusals"].items()) or "none")]
    m = r["mutator"] or {}
    if m:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(m.get("errors", {}).items(),
                                                       key=lambda kv: -kv[1])[:8])
        lines.append(f"tree mutator: {m.get('operations', 0)} operations, "
                     f"{sum(m.get('ok', {}).values())} done; refused: {errs or 'none'}")
    for w in r["dual_writer_windows"][:5]:
        lines.append(f"  DUAL WRITERS {w['nodes']}: {w['end'] - w['start']:.3f} s, "
                     f"{w['count']} records, e.g. {w['seqs'][:5]}")
    if r["problems"]:
        lines.append("problems:")
        lines += [f"  - {p[:400]}" for p in r["problems"][:30]]
    if r.get("logs"):
        lines.append(f"logs kept in {r['logs']}")
    lines.append(f"RESULT: {'PASS' if r['passed'] else 'FAIL'}")
    return "\n".join(lines)
