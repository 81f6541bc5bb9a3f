"""What a newcomer sees of a local run: a line per task (from kfp.local's own records), the full output
in a log file, and a results table that labels a smoke run's claims as full-scale references."""

from __future__ import annotations

import contextlib
import io
import logging
import threading

from vfm.pipeline.local import TaskLog, thread_safe_kfp_logging
from vfm.pipeline.steps import report_table

# kfp.local 2.17's records (kfp/local/task_dispatcher.py, pipeline_orchestrator.py), colours included
KFP_LINES = """\
21:26:34.575 - INFO - Executing task \x1b[96m'shard-dataset'\x1b[0m
{"inputs": {"parameterValues": {"source": "/data/x"}}}
21:26:39.040 - INFO - Task \x1b[96m'shard-dataset'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
21:26:40.000 - INFO - Executing task \x1b[96m'finetune'\x1b[0m
21:26:40.001 - INFO - Executing task \x1b[96m'finetune'\x1b[0m
    [rank0] vfm.train.loop: step 1/180 loss 6.9
21:26:50.000 - INFO - Task \x1b[96m'finetune'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
21:26:55.000 - INFO - Task \x1b[96m'finetune'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
21:27:00.000 - INFO - Pipeline \x1b[95m'vfm-vit-huge'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_task_lines_on_the_console_everything_in_the_log():
    log, console = io.StringIO(), io.StringIO()
    tasks = TaskLog(log, console)
    for chunk in (KFP_LINES[:50], KFP_LINES[50:333], KFP_LINES[333:]):  # writes split mid-line
        tasks.write(chunk)
    assert log.getvalue() == KFP_LINES
    shown = console.getvalue().splitlines()
    assert [line.split()[:2] for line in shown] == [["SUCCESS", "shard-dataset"], ["SUCCESS", "finetune"],
                                                   ["FAILURE", "finetune"], ["FAILURE", "pipeline"]]
    assert "executor" not in console.getvalue() and "vfm.train.loop" not in console.getvalue()
    assert [(n, s) for n, s, _ in tasks.finished] == [("shard-dataset", "SUCCESS"), ("finetune", "SUCCESS"),
                                                      ("finetune", "FAILURE")]
    assert all(sec >= 0 for _, _, sec in tasks.finished)


def test_tasks_are_listed_by_their_display_names_in_the_compiled_dag():
    from vfm.pipeline.dag import build_pipeline
    from vfm.pipeline.local import display_names

    names = display_names(build_pipeline("vit-huge"))
    # one `train` component: its two uses are told apart by the stage the DAG names them after
    assert (names["train"], names["train-2"]) == ("pretrain", "finetune")
    assert names["shard-dataset-3"] == "shard in1k-val" and names["evaluate-4"] == "evaluate knn"
    log, console = io.StringIO(), io.StringIO()
    TaskLog(log, console, names=names).write(KFP_LINES.replace("'finetune'", "'train-2'"))
    assert [line.split()[:2] for line in console.getvalue().splitlines()][1:3] == [["SUCCESS", "finetune"],
                                                                                  ["FAILURE", "finetune"]]


def test_verbose_streams_everything_too():
    log, console = io.StringIO(), io.StringIO()
    TaskLog(log, console, echo=True).write(KFP_LINES)
    assert console.getvalue() == KFP_LINES == log.getvalue()


def test_report_labels_the_scale():
    rows = [("eval.in1k.top1", "92.94 ± 0.16", "89.1"), ("eval.in1k.top5", "99.6", "")]
    smoke = report_table(rows, "smoke")
    assert "achieved (smoke profile)" in smoke and "| paper, full scale: 89.1 |" in smoke
    paper = report_table(rows, "paper")
    assert "| metric | achieved | paper claim |" in paper and "| eval.in1k.top1 | 92.94 ± 0.16 | 89.1 |" in paper


def test_parallel_tasks_keep_their_log_records():
    """kfp.local's per-task logger context, entered from ParallelFor threads, loses records unpatched."""
    from kfp.local import logging_utils

    log, console = io.StringIO(), io.StringIO()
    tasks = TaskLog(log, console)
    gate = threading.Barrier(2)

    def task(name: str, hold: float) -> None:
        with logging_utils.local_logger_context():
            logging.info(f"Executing task '{name}'")
            gate.wait()  # both inside: the first to leave must not take the other's handler away
            threading.Event().wait(hold)
            logging.info(f"Task '{name}' finished with status SUCCESS")



    with contextlib.redirect_stdout(tasks), thread_safe_kfp_logging():
        threads = [threading.Thread(target=task, args=(f"finetune-{i}", 0.05 * i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(n for n, _, _ in tasks.finished) == ["finetune-0", "finetune-1"], log.getvalue()
    assert logging_utils.local_logger_context.__name__ == "local_logger_context"  # restored afterwards


def test_a_local_run_takes_the_users_own_sources(tmp_path):
    import pytest

    from vfm.errors import UserError
    from vfm.pipeline.local import parse_sources

    fall11, val, labels, folder = (tmp_path / n for n in ("fall11_whole.tar", "val.tar", "LOC_val_solution.csv", "imgs"))
    for f in (fall11, val, labels):
        f.write_bytes(b"")
    folder.mkdir()
    given, val_labels = parse_sources("vit-huge", [f"pretrain={fall11}", f"finetune=folder:{folder}", f"val={val}",
                                                   f"val_labels={labels}", f"imagenet_c={folder}"])
    # a role keeps the layout it has on a cluster unless LAYOUT: names another
    assert given == {"pretrain": (str(fall11), "in22k-fall11"), "finetune": (str(folder), "folder"),
                     "val": (str(val), "in1k-val"), "imagenet_c": (str(folder), "imagenet-c")}
    from vfm.pipeline.local import pipeline_arguments

    args = pipeline_arguments("vit-huge", sources={**given, "imagenet_r": ("/r", "imagenet-r")}, bucket="b",
                              mlflow_uri="", s3_endpoint="", profile="smoke", overrides=[], seeds=None)
    assert args["imagenet_c_source"] == str(folder) and args["imagenet_c_corruptions"] == ""
    # archives in object storage are read in place (ranged GETs), not copied here
    assert parse_sources("vit-huge", ["pretrain=s3://b/fall11_whole.tar"])[0] == {
        "pretrain": ("s3://b/fall11_whole.tar", "in22k-fall11")}
    with pytest.raises(UserError, match="reads the roles"):  # k-NN only: no ImageNet-C to take
        parse_sources("dinov2-giant", [f"imagenet_c={folder}"])
    assert val_labels == str(labels)
    for bad, why in ((f"val={val}", "val_labels"), ("detection=/x", "reads the roles"),
                     (f"pretrain={tmp_path / 'absent.tar'}", "does not exist"), ("pretrain", "ROLE=PATH")):
        with pytest.raises(UserError, match=why):
            parse_sources("vit-huge", [bad])


def test_a_local_run_on_cuda_runs_a_rank_per_visible_gpu(monkeypatch):
    import torch

    from vfm.pipeline.local import local_world_overrides

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_world_overrides([]) == ["hardware.gpus=2", "hardware.gpus_per_node=2"]
    assert local_world_overrides(["hardware.gpus=1"]) == []
