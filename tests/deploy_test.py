#!/usr/bin/env python3
"""Checks of deploy/ and docker-compose.yml (no Docker engine or cluster
needed): the files parse, the pieces the deployment relies on are there,
every metric the dashboard and the alert rules use is one the server exports
(server/metrics.cc), the dashboard's queries return data under the labels
the Prometheus Operator's PodMonitor gives (promtool rule tests), its units
fit its series, and, given the binaries, the Kubernetes example's sidecar
and demo trainer run as shipped (on loopback, as the pod's containers would).

  deploy_test.py --repo . [--server-bin build/server/negmine-server \
                           --cli-bin build/client/negmine]
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import unittest

import yaml

REPO = "."
SERVER_BIN = ""  # negmine-server, for the Kubernetes example run
CLI_BIN = ""     # negmine
# The labels the Prometheus Operator gives a PodMonitor's target (the
# PodMonitor "negmine" in namespace "training").
PODMONITOR_LABELS = {"job": "training/negmine", "namespace": "training",
                     "pod": "trainer-x7k2p", "container": "negmine",
                     "endpoint": "metrics", "instance": "10.1.2.3:9464"}
# Metrics the dashboard and alerts use before any server exports them.
NOT_YET_EXPORTED = set()


def path(*p):
    return os.path.join(REPO, *p)


def read(*p):
    with open(path(*p)) as f:
        return f.read()


def load_yaml_docs(p):
    with open(p) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def exported_metrics():
    src = read("server", "metrics.cc")
    names = set(re.findall(r'\.Name\("([a-z_]+)"\)', src))
    names |= set(re.findall(r'add\("(process_[a-z_]+)"', src))
    return names


def used_metrics(text):
    names = set(re.findall(r"\b((?:negmine|process)_[a-z_]+)", text))
    # Histogram series carry a suffix the family name does not.
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


class Deploy(unittest.TestCase):
    def test_compose(self):
        (c,) = load_yaml_docs(path("docker-compose.yml"))
        s = c["services"]
        self.assertEqual(set(s), {"negmine", "trainer", "prometheus", "grafana"})
        self.assertTrue(os.path.exists(path(s["negmine"]["build"]["dockerfile"])))
        self.assertEqual(s["trainer"]["depends_on"]["negmine"]["condition"], "service_healthy")
        for svc in s.values():
            for v in svc.get("volumes", []):
                host = v.split(":")[0]
                if host.startswith("."):
                    self.assertTrue(os.path.exists(path(host)), v)
        for svc in s.values():  # published on loopback only
            for p in svc.get("ports", []):
                self.assertTrue(p.startswith("127.0.0.1:"), p)

    def test_dockerfile(self):
        d = read("deploy", "Dockerfile")
        self.assertGreaterEqual(len(re.findall(r"^FROM ", d, re.M)), 3)
        self.assertIn("FROM debian:bookworm AS build", d)
        self.assertIn("RUN make deps", d)  # the same packages as `make deps`
        self.assertIn("ARG VARIANT=cpu", d)
        self.assertIn("FROM runtime-${VARIANT}", d)
        self.assertRegex(d, r"(?m)^USER negmine$")
        self.assertRegex(d, r"(?m)^HEALTHCHECK .*\n\s+CMD \[\"negmine\".*\"health\"")
        self.assertTrue(os.access(path("deploy", "demo-trainer.sh"), os.X_OK))

    def test_kubernetes(self):
        (k,) = load_yaml_docs(path("deploy", "k8s", "base", "kustomization.yaml"))
        docs = []
        for r in k["resources"]:
            docs += load_yaml_docs(path("deploy", "k8s", "base", r))
        kinds = {d["kind"]: d for d in docs}
        self.assertEqual(set(kinds), {"PersistentVolumeClaim", "Job", "PodMonitor", "NetworkPolicy"})
        pod = kinds["Job"]["spec"]["template"]
        self.assertEqual(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true")
        (side,) = pod["spec"]["initContainers"]
        self.assertEqual(side["restartPolicy"], "Always")  # a native sidecar
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            self.assertEqual(side[probe]["grpc"]["port"], 50051, probe)
        self.assertIn("limits", side["resources"])
        self.assertEqual(side["volumeMounts"][0]["mountPath"], "/var/lib/negmine")
        claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        self.assertEqual(claim, kinds["PersistentVolumeClaim"]["metadata"]["name"])
        self.assertEqual(kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"], "metrics")
        (g,) = load_yaml_docs(path("deploy", "k8s", "overlays", "gpu", "kustomization.yaml"))
        self.assertEqual(g["resources"], ["../../base"])
        (patch,) = load_yaml_docs(path("deploy", "k8s", "overlays", "gpu", g["patches"][0]["path"]))
        self.assertIn("/spec/template/spec/initContainers/0/resources/limits/nvidia.com~1gpu",
                      [op["path"] for op in patch])

    def test_grafana(self):
        (ds,) = load_yaml_docs(path("deploy", "grafana", "provisioning", "datasources",
                                    "prometheus.yml"))
        uid = ds["datasources"][0]["uid"]
        dash = json.loads(read("deploy", "grafana", "dashboards", "negmine.json"))
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("latency", "requests per second", "negatives", "drift", "version",
                      "tree", "gpu memory"):
            self.assertIn(topic, titles)
        for p in dash["panels"]:
            self.assertEqual(p["datasource"]["uid"], uid, p["title"])
            self.assertTrue(p["targets"], p["title"])

    def test_every_metric_used_is_exported(self):
        exported = exported_metrics()
        self.assertIn("negmine_requests_total", exported)
        text = read("deploy", "grafana", "dashboards", "negmine.json")
        text += read("deploy", "prometheus", "alerts.yml")
        used = used_metrics(text)
        missing = used - exported
        self.assertEqual(missing, NOT_YET_EXPORTED,
                         "used by the dashboard or alerts but not exported: %s" % missing)

    def test_alert_tests_cover_every_alert(self):
        (rules,) = load_yaml_docs(path("deploy", "prometheus", "alerts.yml"))
        alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
        (tests,) = load_yaml_docs(path("deploy", "prometheus", "alerts_test.yml"))
        tested = {c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"]
                  if c.get("exp_alerts")}
        self.assertEqual(alerts, tested)


def free_port():
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def label_text(labels):
    """Prometheus series-selector text for a label dict."""
    return ", ".join('%s="%s"' % kv for kv in sorted(labels.items()))


def dashboard_targets():
    """(panel, target) for every query of the dashboard."""
    dash = json.loads(read("deploy", "grafana", "dashboards", "negmine.json"))
    return [(p, t) for p in dash["panels"] for t in p["targets"]]


def substitute(expr, values):
    """The query Grafana sends with every variable at "All" over `values`."""
    for name, vals in values.items():
        # Regex-escaped, then escaped again for PromQL's string literal.
        alt = "|".join(re.escape(v).replace("\\", "\\\\") for v in vals)
        expr = expr.replace("$" + name, "(%s)" % alt)
    return expr


def input_series(metrics, labels):
    """promtool input series for every metric name in `metrics`, with
    `labels` and the labels each family carries."""
    series = []
    for m in sorted(metrics):
        extra = {}
        if m.startswith("negmine_") and m not in ("negmine_negatives_served_total",
                                                 "negmine_mine_batch_queries",
                                                 "negmine_requests_total",
                                                 "negmine_request_duration_seconds") \
                and not m.startswith(("negmine_wal", "negmine_snapshot", "negmine_gpu")):
            extra["collection"] = "default"
        if m.startswith("negmine_gpu"):
            extra["device"] = "0"
        if m.startswith("negmine_request"):
            extra.update(method="Mine", code="OK")
        all_labels = dict(labels, **extra)
        counter = m.endswith("_total")
        if m in ("negmine_request_duration_seconds", "negmine_mine_batch_queries"):
            for le, step in (("0.1", 2), ("1", 5), ("+Inf", 6)):
                series.append({"series": "%s_bucket{%s}" % (m, label_text(dict(all_labels, le=le))),
                               "values": "0+%dx40" % step})
            continue
        series.append({"series": "%s{%s}" % (m, label_text(all_labels)),
                       "values": "0+3x40" if counter else "5x40"})
    return series


class Dashboard(unittest.TestCase):
    def setUp(self):
        if not shutil.which("promtool"):
            self.skipTest("promtool (Debian's prometheus) is not installed")

    def promtool(self, rules, tests):
        tmp = tempfile.mkdtemp(prefix="negmine-dash-")
        try:
            with open(os.path.join(tmp, "rules.yml"), "w") as f:
                yaml.safe_dump(rules, f)
            with open(os.path.join(tmp, "test.yml"), "w") as f:
                yaml.safe_dump(dict(tests, rule_files=["rules.yml"]), f)
            return subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp,
                                  capture_output=True, text=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_every_query_has_data_under_podmonitor_labels(self):
        # Each query as an alert `absent(query)`: one that selects nothing
        # under the PodMonitor's labels fires, and the rule test fails. A
        # second target (another exporter) exports the process metrics too.
        values = {"job": [PODMONITOR_LABELS["job"]],
                  "instance": [PODMONITOR_LABELS["instance"]], "collection": ["default"]}
        rules, used = [], set()
        for p, t in dashboard_targets():
            used |= used_metrics(t["expr"])
            rules.append({"alert": "Empty_%d_%s" % (p["id"], t["refId"]),
                          "expr": "absent(%s)" % substitute(t["expr"], values)})
        other = {"job": "training/other-exporter", "namespace": "training", "pod": "other-1",
                 "container": "other", "endpoint": "metrics", "instance": "10.1.2.4:8080"}
        series = input_series(used, PODMONITOR_LABELS)
        series += input_series({m for m in used if m.startswith("process_")}, other)
        # The process panels show negmine alone, not the other exporter.
        exprs = []
        for p, t in dashboard_targets():
            if "process_" in t["expr"]:
                got = "count(%s)" % substitute(t["expr"], values)
                exprs.append({"expr": got, "eval_time": "9m", "exp_samples": [{"labels": "{}", "value": 1}]})
        r = self.promtool(
            {"groups": [{"name": "dashboard", "rules": rules}]},
            {"evaluation_interval": "15s", "tests": [{
                "interval": "15s", "input_series": series,
                "alert_rule_test": [{"eval_time": "9m", "alertname": r_["alert"], "exp_alerts": []}
                                    for r_ in rules],
                "promql_expr_test": exprs}]})
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertTrue(exprs, "no process panels")

    def test_no_query_names_a_fixed_job(self):
        text = read("deploy", "grafana", "dashboards", "negmine.json")
        text += read("deploy", "prometheus", "alerts.yml")
        hits = re.findall(r'[a-z_]+\{[^}]*job\s*=\s*\\?"[^"\\]*\\?"', text)
        self.assertEqual(hits, [], "a fixed job label: the PodMonitor's is <namespace>/<name>")

    def test_units_fit_the_series(self):
        # (pattern of the query, the unit its series has), first match wins.
        rules = [
            (r"histogram_quantile\(.*_seconds_bucket", "s"),
            (r"rate\(process_cpu_seconds_total", "percentunit"),  # 100% = one core
            (r"rate\(negmine_wal_sync_seconds_total.*/.*rate\(negmine_wal_syncs_total", "s"),
            (r"rate\(negmine_requests_total", "reqps"),
            (r"rate\(negmine_negatives_served_total", "cps"),
            (r"rate\(negmine_(filtered_targets|short_results)_total", "cps"),
            (r"negmine_sampler_accepted_total.*/", "percentunit"),
            (r"_bytes\b", "bytes"),
            (r"_seconds\b", "s"),
            (r"negmine_drift_residual|negmine_tree_looseness", "none"),  # ratios
            (r"increase\(|negmine_index_version|negmine_collection_targets|negmine_drift_step|"
             r"negmine_tree_depth|negmine_tree_rebuild_pending|histogram_quantile\(.*_queries_bucket",
             "short"),  # counts
        ]
        for p, t in dashboard_targets():
            unit = p["fieldConfig"]["defaults"].get("unit")
            for o in p["fieldConfig"].get("overrides", []):
                if o["matcher"] == {"id": "byFrameRefID", "options": t["refId"]}:
                    unit = [x["value"] for x in o["properties"] if x["id"] == "unit"][0]
            want = next((u for pat, u in rules if re.search(pat, t["expr"])), None)
            self.assertIsNotNone(want, "no unit rule for %s" % t["expr"])
            self.assertEqual(unit, want, "%s / %s: %s" % (p["title"], t["refId"], t["expr"]))

    def test_latency_panel_counts_what_the_slo_alert_counts(self):
        (rules,) = load_yaml_docs(path("deploy", "prometheus", "alerts.yml"))
        (slo,) = [r for g in rules["groups"] for r in g["rules"]
                  if r["alert"] == "NegmineMineLatencySLO"]
        sel = re.compile(r"negmine_request_duration_seconds_bucket\{([^}]*)\}")
        def matchers(expr):
            (m,) = set(sel.findall(expr))
            return {x.strip() for x in m.split(",") if "$" not in x}
        want = matchers(slo["expr"])
        latency = [t for p, t in dashboard_targets() if "latency" in p["title"].lower()]
        self.assertTrue(latency)
        for t in latency:
            self.assertEqual(matchers(t["expr"]), want, t["expr"])


class ShippedExamples(unittest.TestCase):
    """The Kubernetes Job and the compose services as shipped: the negmine
    container's arguments (after the image's ENTRYPOINT) and the trainer's
    command and environment, run on loopback (the pod's containers share
    localhost; compose's service name becomes 127.0.0.1). Ports and the data
    dir are local, and ROUNDS is 20 (one drift update)."""

    def setUp(self):
        if not (SERVER_BIN and CLI_BIN):
            self.skipTest("needs --server-bin and --cli-bin")

    def run_example(self, server_args, data_mount, trainer_cmd, trainer_env, server_address):
        entry = json.loads(re.search(r"(?m)^ENTRYPOINT (\[.*\])$", read("deploy", "Dockerfile")).group(1))
        self.assertEqual(entry[0], "negmine-server")
        # The image installs deploy/demo-trainer.sh as demo-trainer.
        self.assertEqual(trainer_cmd, ["demo-trainer"])
        tmp = tempfile.mkdtemp(prefix="negmine-example-")
        port, metrics = free_port(), free_port()
        args = []
        for a in entry[1:] + server_args:
            a = a.replace("=" + data_mount, "=" + os.path.join(tmp, "data"))
            a = re.sub(r"^--listen=.*", "--listen=127.0.0.1:%d" % port, a)
            a = re.sub(r"^--metrics_listen=.*", "--metrics_listen=127.0.0.1:%d" % metrics, a)
            args.append(a)
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        os.symlink(os.path.abspath(CLI_BIN), os.path.join(bindir, "negmine"))
        os.symlink(os.path.abspath(path("deploy", "demo-trainer.sh")),
                   os.path.join(bindir, "demo-trainer"))
        env = {"PATH": bindir + ":/usr/bin:/bin", "HOME": tmp}
        env.update(trainer_env)
        self.assertEqual(env["NEGMINE_SERVER"], server_address)
        env["NEGMINE_SERVER"] = "127.0.0.1:%d" % port
        env["ROUNDS"] = "20"
        server = subprocess.Popen([SERVER_BIN] + args + ["--log_level=warning"])
        try:
            r = subprocess.run(trainer_cmd, env=env, capture_output=True, text=True, timeout=600)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("demo-trainer: 20 rounds done", r.stdout)
            self.assertIn("drift at step 20", r.stdout)
            return r.stdout
        finally:
            server.terminate()
            server.wait(timeout=60)
            shutil.rmtree(tmp, ignore_errors=True)

    def test_kubernetes_job(self):
        (k,) = load_yaml_docs(path("deploy", "k8s", "base", "kustomization.yaml"))
        (job,) = [d for r in k["resources"] for d in load_yaml_docs(path("deploy", "k8s", "base", r))
                  if d["kind"] == "Job"]
        spec = job["spec"]["template"]["spec"]
        (side,) = spec["initContainers"]
        (trainer,) = spec["containers"]
        out = self.run_example(side.get("args", []), side["volumeMounts"][0]["mountPath"],
                               trainer["command"], {e["name"]: e["value"] for e in trainer["env"]},
                               "127.0.0.1:50051")  # localhost in the pod
        # The sidecar starts empty: the trainer made the collection it mines.
        self.assertIn("creating collection default", out)

    def test_compose(self):
        (c,) = load_yaml_docs(path("docker-compose.yml"))
        s = c["services"]
        mount = s["negmine"]["volumes"][0].split(":")[1]
        self.run_example(s["negmine"]["command"], mount, s["trainer"]["entrypoint"],
                         dict(s["trainer"]["environment"]), "negmine:50051")


# ---- Sharded deployments (deploy/k8s/sharded): rendered by kubectl kustomize.

def kustomize(*p):
    """The documents `kubectl kustomize` renders for deploy/k8s/<p>."""
    out = subprocess.run(["kubectl", "kustomize", path("deploy", "k8s", *p)],
                         check=True, capture_output=True, text=True).stdout
    return {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all(out) if d is not None}


@unittest.skipIf(shutil.which("kubectl") is None,
                 "kubectl is not installed (Debian: apt-get install kubernetes-client)")
class ShardedManifests(unittest.TestCase):
    def test_statefulset_headless_service_and_pdb(self):
        docs = kustomize("sharded", "statefulset")
        kinds = {k for k, _ in docs}
        self.assertEqual(kinds, {"Service", "StatefulSet", "PodDisruptionBudget",
                                 "NetworkPolicy"})
        sts = docs[("StatefulSet", "negmine")]
        svc = docs[("Service", sts["spec"]["serviceName"])]
        self.assertEqual(svc["spec"]["clusterIP"], "None")  # headless: a name per shard
        self.assertTrue(svc["spec"]["publishNotReadyAddresses"])
        pod_labels = sts["spec"]["template"]["metadata"]["labels"]
        for selector in (svc["spec"]["selector"],
                         sts["spec"]["selector"]["matchLabels"],
                         docs[("PodDisruptionBudget", "negmine-shards")]["spec"]["selector"]
                         ["matchLabels"]):
            self.assertLessEqual(selector.items(), pod_labels.items())
        self.assertEqual(docs[("PodDisruptionBudget", "negmine-shards")]["spec"]
                         ["maxUnavailable"], 1)
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        self.assertIn("--listen=0.0.0.0:50051", c["args"])
        self.assertEqual(c["volumeMounts"][0]["name"],
                         sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            self.assertEqual(c[probe]["grpc"]["port"], 50051, probe)
        self.assertEqual(c["image"], "negmine:cpu")

    def test_sidecar_per_rank_layout(self):
        docs = kustomize("sharded", "sidecars")
        job = docs[("Job", "trainer")]
        spec = job["spec"]
        self.assertEqual(spec["completionMode"], "Indexed")
        ranks = spec["parallelism"]
        self.assertEqual(spec["completions"], ranks)
        pod = spec["template"]["spec"]
        svc = docs[("Service", pod["subdomain"])]
        self.assertEqual(svc["spec"]["clusterIP"], "None")
        self.assertEqual(svc["spec"]["selector"], {"job-name": "trainer"})
        (side,) = pod["initContainers"]
        self.assertEqual(side["restartPolicy"], "Always")  # a native sidecar
        (trainer,) = pod["containers"]
        env = {e["name"]: e["value"] for e in trainer["env"]}
        # Shard i is rank i's sidecar, by the Indexed Job's stable pod names.
        self.assertEqual(env["NEGMINE_SHARDS"].split(","),
                         [f"trainer-{i}.{pod['subdomain']}:50051" for i in range(ranks)])
        policy = docs[("NetworkPolicy", "trainer-shards")]["spec"]
        grpc_rule = [r for r in policy["ingress"]
                     if any(p["port"] == 50051 for p in r["ports"])]
        self.assertEqual(grpc_rule[0]["from"][0]["podSelector"]["matchLabels"],
                         {"job-name": "trainer"})

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=".")
    ap.add_argument("--server-bin", default="")
    ap.add_argument("--cli-bin", default="")
    args, rest = ap.parse_known_args()
    REPO = args.repo
    SERVER_BIN, CLI_BIN = args.server_bin, args.cli_bin
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
