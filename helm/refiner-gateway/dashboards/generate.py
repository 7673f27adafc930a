#!/usr/bin/env python3
"""Generates refiner-gateway.json, the Grafana dashboard, beside this file.

    python3 helm/refiner-gateway/dashboards/generate.py helm/refiner-gateway/dashboards/refiner-gateway.json

Edit the panels here, not in the JSON: .ci/chart-check fails when the JSON differs from
what this script writes, and tests/chart.rs checks that every query uses exported metrics.
"""
import json, sys
SEL='namespace="$namespace", job="$job", pod=~"$pod"'
def s(metric, extra=""):
    # A series selector: the dashboard's variables plus `extra` matchers.
    m = SEL + (", " + extra if extra else "")
    return metric + "{" + m + "}"
panels=[]; pid=[0]; y=[0]; x=[0]
def nid():
    pid[0]+=1; return pid[0]
def row(title):
    x[0]=0
    panels.append({"type":"row","title":title,"id":nid(),"collapsed":False,
                   "gridPos":{"h":1,"w":24,"x":0,"y":y[0]},"panels":[]})
    y[0]+=1
def panel(title, targets, unit="short", kind="timeseries", w=8, h=8, description="", stack=False):
    if x[0]+w>24:
        x[0]=0; y[0]+=h
    ds={"type":"prometheus","uid":"${datasource}"}
    p={"type":kind,"title":title,"id":nid(),"datasource":ds,"description":description,
       "gridPos":{"h":h,"w":w,"x":x[0],"y":y[0]},
       "fieldConfig":{"defaults":{"unit":unit},"overrides":[]},"options":{},
       "targets":[{"refId":chr(65+i),"expr":e,"legendFormat":l,"datasource":ds} for i,(e,l) in enumerate(targets)]}
    if kind=="timeseries":
        p["fieldConfig"]["defaults"]["custom"]={"drawStyle":"line","lineWidth":1,"fillOpacity":10,
            "stacking":{"mode":"normal" if stack else "none","group":"A"}}
        p["options"]={"legend":{"displayMode":"list","placement":"bottom","showLegend":True},"tooltip":{"mode":"multi","sort":"desc"}}
    else:
        p["options"]={"reduceOptions":{"calcs":["lastNotNull"],"fields":"","values":False},"colorMode":"value","graphMode":"area","textMode":"auto"}
    panels.append(p); x[0]+=w
def endrow(h=8):
    x[0]=0; y[0]+=h
R="[$__rate_interval]"
ACCEPTED='outcome="accepted"'
DEAD='outcome="dead_lettered"'
def q(p, metric, by, extra=""):
    return f"histogram_quantile({p}, sum by (le{', ' + by if by else ''}) (rate({s(metric + '_bucket', extra)}{R})))"

row("Overview")
panel("Ready",[(f"min({s('gateway_ready')})","ready")],kind="stat",w=4,h=4,description="1 when the last /readyz check passed.")
panel("Backlog (events)",[(f"sum({s('gateway_spool_depth_events')})","depth")],kind="stat",w=4,h=4)
panel("Oldest undelivered event",[(f"max({s('gateway_spool_oldest_event_age_seconds')})","age")],unit="s",kind="stat",w=4,h=4)
panel("Dead letters",[(f"sum({s('gateway_spool_dead_letters_events')})","dead letters")],kind="stat",w=4,h=4)
panel("Circuit breaker",[(f"max({s('gateway_dispatch_circuit_open')})","open")],kind="stat",w=4,h=4,description="1 while the circuit breaker holds delivery back.")
panel("Version",[(f"max by (version) ({s('gateway_build_info')})","{{version}}")],kind="stat",w=4,h=4)
endrow(4)
row("Ingest")
panel("Events received",[(f"sum by (source, outcome) (rate({s('gateway_ingest_events_total')}{R}))","{{source}} {{outcome}}"),
                         (f"sum by (source) (rate({s('gateway_ingest_events_skipped_total')}{R}))","{{source}} skipped")],unit="ops",
      description="accepted: durable and answered 200; refused: answered 429/503 (the client retries); skipped: answered 200 but dropped.")
panel("Accepted events by type",[(f"sum by (type) (rate({s('gateway_ingest_events_total', ACCEPTED)}{R}))","{{type}}")],unit="ops",stack=True)
panel("Requests by status",[(f"sum by (route, status) (rate({s('gateway_ingest_requests_total')}{R}))","{{route}} {{status}}")],unit="reqps")
panel("Skipped at ingest, and dedup hits",[(f"sum by (reason) (rate({s('gateway_ingest_events_skipped_total')}{R}))","{{reason}}"),
                                      (f"sum(rate({s('gateway_ingest_duplicates_total')}{R}))","duplicates")],unit="ops")
panel("Request latency",[(q(0.5,'gateway_ingest_request_duration_seconds','route'),"p50 {{route}}"),
                         (q(0.99,'gateway_ingest_request_duration_seconds','route'),"p99 {{route}}")],unit="s")
panel("Request size",[(q(0.5,'gateway_ingest_request_size_bytes',''),"p50"),
                      (q(0.99,'gateway_ingest_request_size_bytes',''),"p99")],unit="bytes")
endrow()
row("Spool")
panel("Backlog",[(f"sum({s('gateway_spool_depth_events')})","queued events")],description="Sampled every spool.stats_interval_ms.")
panel("Oldest undelivered event",[(f"max({s('gateway_spool_oldest_event_age_seconds')})","age")],unit="s")
panel("Dead letters",[(f"sum({s('gateway_spool_dead_letters_events')})","stored"),
                      (f"sum(rate({s('gateway_dispatch_events_total', DEAD)}{R})) * 60","new per minute")])
panel("Commit latency",[(q(0.5,'gateway_spool_commit_seconds',''),"p50"),
                        (q(0.99,'gateway_spool_commit_seconds',''),"p99"),
                        (q(0.99,'gateway_spool_stats_seconds',''),"stats sample p99")],unit="s")
panel("Group commit size",[(f"sum(rate({s('gateway_spool_group_commands_sum')}{R})) / sum(rate({s('gateway_spool_group_commands_count')}{R}))","commands per transaction")])
panel("Spool errors",[(f"sum(rate({s('gateway_spool_errors_total')}{R}))","failed transactions")],unit="ops")
endrow()
row("Delivery")
panel("Delivery outcomes",[(f"sum by (outcome) (rate({s('gateway_dispatch_events_total')}{R}))","{{outcome}}")],unit="ops",
      description="forwarded, skipped (not forwarded), retried (attempts), dead_lettered.")
panel("Not forwarded, by reason",[(f"sum by (reason) (rate({s('gateway_dispatch_skipped_total')}{R}))","{{reason}}")],unit="ops")
panel("Delivery latency (accepted to Refiner 2xx)",[(q(0.5,'gateway_dispatch_delivery_latency_seconds',''),"p50"),
                                                   (q(0.99,'gateway_dispatch_delivery_latency_seconds',''),"p99")],unit="s")
panel("Refiner calls by status",[(f"sum by (endpoint, status) (rate({s('gateway_refiner_calls_total')}{R}))","{{endpoint}} {{status}}")],unit="reqps")
panel("Refiner call latency",[(q(0.99,'gateway_refiner_call_duration_seconds','endpoint'),"p99 {{endpoint}}")],unit="s")
panel("Concurrency",[(f"sum({s('gateway_dispatch_concurrency_limit')})","adaptive limit"),
                     (f"sum({s('gateway_dispatch_in_flight_calls')})","in flight"),
                     (f"max({s('gateway_dispatch_circuit_open')})","circuit open")])
endrow()
row("Usage this month")
panel("Tracked users",[(f"max by (source) ({s('gateway_usage_monthly_users')})","{{source}}")],description="Distinct identified users with an event accepted this month (Refiner bills by monthly tracked users).")
panel("Events",[(f"max by (source) ({s('gateway_usage_monthly_events')})","{{source}}")],description="Events accepted this month, duplicates not counted.")
panel("Page views",[(f"max by (source) ({s('gateway_usage_monthly_page_views')})","{{source}}")])
endrow()
row("Process")
panel("Resident memory",[(f"sum by (pod) ({s('process_resident_memory_bytes')})","{{pod}}")],unit="bytes")
panel("CPU",[(f"sum by (pod) (rate({s('process_cpu_seconds_total')}{R}))","{{pod}}")],unit="percentunit")
panel("Open file descriptors",[(f"sum by (pod) ({s('process_open_fds')})","{{pod}}")])
endrow()

def var(name,label,query,multi=False,include_all=False):
    v={"name":name,"label":label,"type":"query","datasource":{"type":"prometheus","uid":"${datasource}"},
       "query":{"query":query,"refId":name},"definition":query,"refresh":2,"sort":1,
       "multi":multi,"includeAll":include_all,"current":{}}
    if include_all: v["allValue"]=".*"
    return v
dash={
 "title":"refiner-gateway","uid":"refiner-gateway","editable":True,"schemaVersion":39,"version":1,
 "tags":["refiner-gateway"],"timezone":"browser","refresh":"30s","time":{"from":"now-6h","to":"now"},
 "description":"Ingest, spool, delivery to Refiner and process metrics of refiner-gateway (docs/operations.md).",
 "templating":{"list":[
   {"name":"datasource","label":"Data source","type":"datasource","query":"prometheus","current":{},"hide":0},
   var("namespace","Namespace","label_values(gateway_build_info, namespace)"),
   var("job","Job","label_values(gateway_build_info{namespace=\"$namespace\"}, job)"),
   var("pod","Pod","label_values(gateway_build_info{namespace=\"$namespace\", job=\"$job\"}, pod)",True,True),
 ]},
 "annotations":{"list":[]},"panels":panels,
}
open(sys.argv[1],'w').write(json.dumps(dash,indent=2)+"\n")
print(len(panels), "panels")
