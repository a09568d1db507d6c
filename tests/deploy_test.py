#!/usr/bin/env python3
"""Static checks of deploy/ and docker-compose.yml (no Docker engine or
cluster needed): the files parse, the pieces the deployment relies on are
there, and every metric the dashboard and the alert rules use is one the
server exports (server/metrics.cc), except the GPU metrics that the CUDA
backend will export.

  deploy_test.py --repo .
"""
import argparse
import json
import os
import re
import sys
import unittest

import yaml

REPO = "."
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=".")
    args, rest = ap.parse_known_args()
    REPO = args.repo
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
