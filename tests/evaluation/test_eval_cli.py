"""`llmtrain eval MODEL --tasks`: a table and a JSON file; unknown tasks and a missing lm-eval are one line,
exit 2; the offline tasks are current and hold only passages the bundled training split never has."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from evalhelpers import need_lm_eval
from helpers import BIN, ROOT, env, free_port

from llmtrain.cli import main


def test_eval_tasks_prints_a_table_and_writes_json(model_dir, local_tasks, tmp_path, capsys):
    need_lm_eval()
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--tasks",
                f"llmtrain_next_verse,{local_tasks / 'local_cloze.yaml'}",
                "--limit",
                "3",
                "--device",
                "cpu",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "llmtrain_next_verse" in printed and "local_cloze" in printed and "acc_norm" in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"llmtrain_next_verse", "local_cloze"}
    assert 0 <= results["llmtrain_next_verse"]["acc,none"] <= 1


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_results(model_dir, local_tasks, tmp_path, capsys):
    """torchrun with 2 ranks: each scores every other document, rank 0 gathers and writes the same metrics."""
    need_lm_eval()
    from llmtrain.evaluation.run import flat_metrics

    args = ["eval", str(model_dir), "--tasks", str(local_tasks), "--device", "cpu", "--batch-size", "2"]
    assert main([*args, "--output", str(tmp_path / "one.json")]) == 0
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "llmtrain.cli",
        *args,
        "--output",
        str(tmp_path / "two.json"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("results: ") == 1  # rank 0 alone prints and writes
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["results"]["local_choice"]["sample_len"] == 5
    assert flat_metrics(two) == pytest.approx(flat_metrics(one), rel=1e-9)


def test_unknown_task_is_one_line_exit_2(model_dir, capsys):
    need_lm_eval()
    assert main(["eval", str(model_dir), "--tasks", "llmtrain_clozee,hellaswag"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: unknown task(s) llmtrain_clozee")
    assert "did you mean llmtrain_cloze" in err and "hellaswag" not in err.split(";")[0].split("(")[0]
    assert main(["eval", str(model_dir), "--tasks", "missing/tasks.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: missing/tasks.yaml: no such task YAML file"


def test_without_lm_eval_the_command_says_how_to_install_it(model_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(model_dir), "--tasks", "llmtrain_cloze"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install -e .[eval]" in err


def test_offline_tasks_are_current_and_held_out():
    """The committed JSONL equal a fresh build from the bundled corpus, and no passage of them (the cloze
    verse, the real next verse) occurs in any document of the bundled training split."""
    from llmtrain.data import DataConfig
    from llmtrain.data.bundled import _train_texts, cache_root
    from llmtrain.evaluation import offline

    assert offline.main(["--check"]) == 0
    cloze = [json.loads(line) for line in (offline.TASKS_DIR / "cloze.jsonl").read_text().splitlines()]
    choice = [json.loads(line) for line in (offline.TASKS_DIR / "next_verse.jsonl").read_text().splitlines()]
    assert len(cloze) == len(choice) == 144
    passages = [d["context"].split("\n")[-1] + " " + d["target"] for d in cloze] + [
        d["choices"][d["gold"]] for d in choice
    ]
    train = "\n".join(_train_texts(DataConfig(), cache_root()))
    assert len(train) > 4_000_000
    assert [p for p in passages if p in train] == []


def test_offline_task_requests():
    """The requests lm-eval builds from the offline YAMLs: the cloze word after a space (loglikelihood tasks
    get no target_delimiter), the four candidate verses each on a new line after the context."""
    need_lm_eval()
    from lm_eval.tasks import get_task_dict

    from llmtrain.evaluation.run import task_manager

    tm, names = task_manager("llmtrain_cloze,llmtrain_next_verse")
    tasks = get_task_dict(names, tm)
    cloze, choice = tasks["llmtrain_cloze"], tasks["llmtrain_next_verse"]
    for task in (cloze, choice):
        task.build_all_requests(limit=1, rank=0, world_size=1)
    assert [i.args for i in cloze.instances] == [
        (
            "And it came to pass, when men began to multiply on the face of the earth, and daughters were born unto "
            "them, That the sons of God saw the daughters of men that they were fair; and they took them wives of all "
            "which they chose.\nAnd the LORD said, My spirit shall not always strive with man, for that he also is "
            "flesh: yet his days shall be an hundred and twenty years.\nThere were giants in the earth in those days; "
            "and also after that, when the sons of God came in unto the daughters of men, and they bare children to "
            "them, the same became mighty men which were of old, men of",
            " renown",
        )
    ]
    args = [i.args for i in choice.instances]
    assert len(args) == 4 and all(ctx == args[0][0] and cont.startswith("\n") for ctx, cont in args)
    assert args[0][0].startswith("And it came to pass, when men began to multiply")
