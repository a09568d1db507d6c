#!/usr/bin/env python3
"""A real Prometheus (Debian's `prometheus`) scrapes a running negmine-server
on loopback while the CLI mines from it; the key series must exist, with sane
values, through Prometheus's HTTP query API. The deploy alert rules are
loaded too, and must be healthy.

  prometheus_test.py --server-bin build/server/negmine-server \
      --cli-bin build/client/negmine --rules deploy/prometheus/alerts.yml
"""
import argparse
import json
import re
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

DEADLINE_S = 90  # bounded wait for the series, not a timing assertion


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(prom, expr):
    url = "http://%s/api/v1/query?%s" % (prom, urllib.parse.urlencode({"query": expr}))
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError("query %r: %s" % (expr, body))
    return [float(v["value"][1]) for v in body["data"]["result"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-bin", required=True)
    ap.add_argument("--cli-bin", required=True)
    ap.add_argument("--rules", required=True)
    ap.add_argument("--prometheus", default="/usr/bin/prometheus")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="negmine-prom-")
    procs = []
    try:
        metrics_port, prom_port = free_port(), free_port()
        port_file = os.path.join(tmp, "port")
        server = subprocess.Popen([
            args.server_bin, "--listen=127.0.0.1:0", "--port_file=" + port_file,
            "--data_dir=" + os.path.join(tmp, "data"),
            "--metrics_listen=127.0.0.1:%d" % metrics_port, "--default_dim=16",
            "--generate_targets=5000", "--stats_interval_seconds=1", "--log_level=warning"])
        procs.append(server)
        start = time.time()
        while not os.path.exists(port_file) or not open(port_file).read().strip():
            if server.poll() is not None or time.time() - start > 60:
                raise RuntimeError("negmine-server did not start")
            time.sleep(0.05)
        address = "127.0.0.1:" + open(port_file).read().strip()

        rules = os.path.join(tmp, "alerts.yml")
        shutil.copy(args.rules, rules)
        config = os.path.join(tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "rule_files:\n  - %s\n"
                    "scrape_configs:\n  - job_name: negmine\n    static_configs:\n"
                    "      - targets: ['127.0.0.1:%d']\n" % (rules, metrics_port))
        prom = "127.0.0.1:%d" % prom_port
        procs.append(subprocess.Popen([
            args.prometheus, "--config.file=" + config,
            "--storage.tsdb.path=" + os.path.join(tmp, "tsdb"),
            "--web.listen-address=" + prom, "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def cli(*a):
            subprocess.run([args.cli_bin, "--server", address] + list(a), check=True,
                           stdout=subprocess.DEVNULL)

        # The mining load, a drift update and exact sampling (acceptance).
        cli("drift", "--collection", "default", "--model-step", "5", "--simulate", "--seed", "1")
        cli("snapshot")
        checks = {
            'up{job="negmine"}': lambda v: v == [1.0],
            'sum(negmine_requests_total{method="Mine", code="OK"})': lambda v: v and v[0] > 0,
            # Labelled by collection and mine mode: the top-k and the sampling
            # mines of the loop below land in different series.
            ('sum(negmine_requests_total{method="Mine", code="OK", collection="default", '
             'mode="top_k"})'): lambda v: v and v[0] > 0,
            ('sum(negmine_requests_total{method="Mine", code="OK", collection="default", '
             'mode="sample"})'): lambda v: v and v[0] > 0,
            'count(negmine_build_info{version!="", commit!="", backends=~"cpu.*"})':
                lambda v: v == [1.0],
            'negmine_recovery_phase{phase="done"}': lambda v: v == [1.0],
            "negmine_recovery_progress": lambda v: v == [1.0],
            "negmine_commits_waiting": lambda v: v == [0.0],
            "negmine_negatives_served_total": lambda v: v and v[0] > 0,
            # Targets below min_score, counted by filter.
            'negmine_filtered_targets_total{filter="min_score"}': lambda v: v and v[0] > 0,
            "sum(negmine_mine_batch_queries_count)": lambda v: v and v[0] > 0,
            'negmine_collection_targets{collection="default"}': lambda v: v == [5000.0],
            'negmine_index_version{collection="default"}': lambda v: v and v[0] >= 2,
            'negmine_index_memory_bytes{collection="default"}': lambda v: v and v[0] > 5000 * 64,
            'negmine_tree_nodes{collection="default"}': lambda v: v and v[0] > 1,
            'negmine_tree_depth{collection="default"}': lambda v: v and v[0] >= 2,
            'negmine_tree_looseness{collection="default"}': lambda v: v and 1 <= v[0] < 100,
            'negmine_drift_step{collection="default"}': lambda v: v == [5.0],
            'negmine_drift_residual{collection="default"}': lambda v: v and 0 <= v[0] < 1,
            'negmine_sampler_accepted_total{collection="default"}': lambda v: v and v[0] > 0,
            ('sum(negmine_sampler_accepted_total) / sum(negmine_sampler_proposals_total)'):
                lambda v: v and 0 < v[0] <= 1,
            ('histogram_quantile(0.99, sum by (le) '
             '(rate(negmine_request_duration_seconds_bucket{method="Mine"}[1m])))'):
                lambda v: v and 0 < v[0] < 60,
            "process_resident_memory_bytes": lambda v: v and v[0] > 1e6,
            "negmine_wal_syncs_total": lambda v: v and v[0] > 0,
            "negmine_wal_sync_seconds_total": lambda v: v and v[0] > 0,
            "negmine_wal_bytes": lambda v: v and v[0] >= 0,
            "negmine_snapshots_total": lambda v: v == [1.0],
            "negmine_snapshot_bytes": lambda v: v and v[0] > 5000 * 16 * 4,
            "process_cpu_seconds_total": lambda v: v and v[0] > 0,
            'ALERTS{alertname="NegmineDown"}': lambda v: v == [],
        }
        start = time.time()
        failing = dict(checks)
        last = {}
        while failing and time.time() - start < DEADLINE_S:
            cli("mine", "--collection", "default", "--random-queries", "8", "--k", "10")
            cli("mine", "--collection", "default", "--random-queries", "4", "--k", "10",
                "--min-score", "0.5")
            cli("mine", "--collection", "default", "--random-queries", "2", "--k", "4",
                "--mode", "sample", "--sampler", "exact", "--temperature", "0.5")
            for expr, ok in list(failing.items()):
                try:
                    last[expr] = query(prom, expr)
                except OSError as e:  # Prometheus still starting
                    last[expr] = repr(e)
                    continue
                if ok(last[expr]):
                    del failing[expr]
            time.sleep(0.5)
        for expr in checks:
            print("%-100s %s" % (expr, "ok" if expr not in failing else "FAILED: %s" % last.get(expr)))
        # The deploy rules loaded and evaluate cleanly.
        with urllib.request.urlopen("http://%s/api/v1/rules" % prom, timeout=5) as r:
            groups = json.load(r)["data"]["groups"]
        rules_loaded = [r for g in groups for r in g["rules"]]
        bad = [r["name"] for r in rules_loaded if r.get("health") not in ("ok", "unknown")]
        print("alert rules loaded: %d, unhealthy: %s" % (len(rules_loaded), bad))
        with open(args.rules) as f:
            want_rules = len(re.findall(r"(?m)^\s*- alert:", f.read()))
        if failing or len(rules_loaded) != want_rules or bad:
            return 1
        print("prometheus_test: all passed")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
