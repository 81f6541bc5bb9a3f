"""Launcher contract against a fake Kubernetes API on loopback: the created object is the built spec,
Succeeded passes, Failed / timeout / restart cap / cancel fail the step and delete the job."""

from __future__ import annotations

import signal
import threading

import pytest
from kubernetes import client as k8s

from tests.helpers.fake_k8s import cancel_with_sigterm, cond
from vfm.launch import JobFailed, JobOptions, JobTimeout, build_job, job_name, to_manifest, trainer_args
from vfm.launch.cluster import ClusterBackend, kube_configuration
from vfm.recipes import load_recipe

JOB_PATH = "/apis/kubeflow.org/v1/namespaces/vision/pytorchjobs"


def job(run="run-1"):
    recipe = load_recipe("vit-huge")
    opts = JobOptions(name=job_name(recipe.id, "pretrain", run), namespace="vision",
                      image="ghcr.io/vfm-project/vfm-trainer:0.1.0", labels={"vfm.io/run": run},
                      args=trainer_args(recipe.id, "pretrain", data="s3://d/manifest.json", out="s3://o"))
    return to_manifest(build_job(recipe, opts))


def backend(fake, lines):
    return ClusterBackend(api=k8s.ApiClient(kube_configuration(fake.url)), poll_s=0.05, log=lines.append)


def test_success_creates_the_built_spec_streams_master_log_and_keeps_the_job(fake_k8s):
    m = job()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[cond("Created")], [cond("Created"), cond("Running")],
                                [cond("Created"), cond("Running")],
                                [cond("Created"), cond("Running", "False"), cond("Succeeded")]]
    fake_k8s.logs[f"{name}-master-0"] = "step 1 loss=6.9\nstep 2 loss=6.1\n"
    lines: list[str] = []
    result = backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=2)
    assert result.state == "Succeeded" and result.restarts == 0
    assert fake_k8s.created == [m]  # exactly the spec the builder made, byte for byte
    assert ("POST", JOB_PATH) in fake_k8s.requests
    assert f"[{name}-master-0] step 2 loss=6.1" in lines
    assert fake_k8s.deleted == []  # a succeeded job is left to its TTL / cleanPodPolicy


def test_failed_job_fails_the_step_with_the_jobs_reason_and_is_deleted(fake_k8s):
    m = job()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[cond("Created"), cond("Running")],
                                [cond("Created"), cond("Failed", reason="PyTorchJobFailed",
                                                       message="master-0 exited with code 2")]]
    with pytest.raises(JobFailed, match="PyTorchJobFailed: master-0 exited with code 2"):
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=2)
    assert fake_k8s.deleted == [name]


def test_timeout_fails_the_step_and_deletes_the_job(fake_k8s):
    m = job()
    fake_k8s.timelines[m["metadata"]["name"]] = [[cond("Created"), cond("Running")]]
    with pytest.raises(JobTimeout, match="not finished after 1 s"):
        backend(fake_k8s, []).run(m, timeout_s=1, max_restarts=2)
    assert fake_k8s.deleted == [m["metadata"]["name"]]


def test_restarts_past_our_cap_fail_the_step(fake_k8s):
    m = job()
    restarting = [[cond("Created"), cond("Restarting", t=f"2026-01-01T00:0{i}:00Z")] for i in range(4)]
    fake_k8s.timelines[m["metadata"]["name"]] = restarting
    with pytest.raises(JobFailed, match="RestartCapExceeded: restarted 2 times, more than the cap of 1"):
        backend(fake_k8s, []).run(m, timeout_s=30, max_restarts=1)
    assert fake_k8s.deleted == [m["metadata"]["name"]]


def test_cancel_sigterm_deletes_the_job(fake_k8s):
    m = job()
    fake_k8s.timelines[m["metadata"]["name"]] = [[cond("Created"), cond("Running")]]
    cancel_with_sigterm(lambda: backend(fake_k8s, []).run(m, timeout_s=60, max_restarts=2))
    assert fake_k8s.deleted == [m["metadata"]["name"]]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_retried_step_adopts_its_running_job_but_replaces_a_failed_one(fake_k8s):
    m = job()
    name = m["metadata"]["name"]
    fake_k8s.jobs[("vision", name)] = m  # left by an earlier attempt of this step
    fake_k8s.timelines[name] = [[cond("Created"), cond("Running")], [cond("Succeeded")]]
    lines: list[str] = []
    backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=2)
    assert fake_k8s.created == [] and any("adopting" in line for line in lines)

    fake_k8s.jobs[("vision", name)] = m
    fake_k8s.timelines[name] = [[cond("Failed", reason="Old")]]
    with pytest.raises(JobFailed, match="Old"):  # the replacement follows the same (scripted) timeline
        backend(fake_k8s, lines).run(m, timeout_s=30, max_restarts=2)
    assert fake_k8s.created == [m] and fake_k8s.deleted[0] == name


def test_job_deleted_under_the_launcher_fails_the_step(fake_k8s):
    m = job()
    name = m["metadata"]["name"]
    fake_k8s.timelines[name] = [[cond("Created")]]
    be = backend(fake_k8s, [])
    threading.Timer(0.3, lambda: fake_k8s.jobs.pop(("vision", name))).start()
    with pytest.raises(JobFailed, match="deleted before it finished"):
        be.run(m, timeout_s=30, max_restarts=2)


def test_exit_handler_cleanup_deletes_every_job_of_the_run(fake_k8s):
    be = backend(fake_k8s, [])
    for run in ("run-1", "run-2"):
        be.create(job(run))
    assert be.delete_run_jobs("run-1", "vision") == [job("run-1")["metadata"]["name"]]
    assert [n for (_, n) in fake_k8s.jobs] == [job("run-2")["metadata"]["name"]]


def test_the_pod_template_is_read_from_the_jobs_namespace_with_clear_404_and_403(fake_k8s):
    from vfm.errors import UserError

    template = {"spec": {"containers": [{"name": "pytorch", "image": "vfm-trainer"}], "priorityClassName": "p"}}
    fake_k8s.pod_templates[("vfm", "vfm-trainer")] = template
    b = backend(fake_k8s, [])
    assert b.pod_template("vfm") == template
    assert ("GET", "/api/v1/namespaces/vfm/podtemplates/vfm-trainer") in fake_k8s.requests
    with pytest.raises(UserError, match="no PodTemplate other/vfm-trainer: .*apply the overlay"):
        b.pod_template("other")
    fake_k8s.forbidden.add("/api/v1/namespaces/vfm/podtemplates/vfm-trainer")
    with pytest.raises(UserError, match="may not read PodTemplate vfm/vfm-trainer: apply manifests/base/rbac.yaml"):
        b.pod_template("vfm")
