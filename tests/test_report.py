"""The report card reads a run's own files: its table, targets and plots follow the numbers given."""

import json

from nanomind.report import shows_steps, write_report


def test_report_tables_and_targets_come_from_the_run_files(tmp_path):
    for stage, rows in {"sft": [{"step": 1, "loss": 2.0, "tokens": 100, "tokens_per_s": 50.0},
                                {"step": 2, "loss": 1.5, "tokens": 100, "tokens_per_s": 150.0, "val_loss": 1.7}],
                        "dpo": [{"step": 1, "loss": 0.69, "tokens": 40, "tokens_per_s": 10.0, "reward_accuracy": 0.5,
                                 "reward_margin": 0.1}]}.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp_path / stage / "DONE").write_text("12.5s\n")
    (tmp_path / "teacher-answers").mkdir()  # a stage that trains nothing: its time only
    (tmp_path / "teacher-answers" / "DONE").write_text("30.9s\n")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({
        "sft": {"sft_loss": 1.0, "answer_format": 0.97, "preference_accuracy": 0.7},
        "dpo": {"sft_loss": 1.1, "answer_format": 0.9, "preference_accuracy": 0.78, "arithmetic_exact": 0.05,
                "arithmetic_shows_steps": 0.1},
        "grpo": {"sft_loss": 1.2, "arithmetic_exact": 0.16, "arithmetic_shows_steps": 0.9},
        "distill": {"sft_loss": 2.0}, "student": {"sft_loss": 2.5}}))
    report = write_report(tmp_path, [("What is 2 plus 2?", "4")]).read_text()

    assert "| sft | 12.5s | 2 | 200 | 100 | 1.500 | 1.700 |" in report  # steps, tokens, mean tok/s, losses
    assert "| dpo | 12.5s | 1 | 40 | 10 | 0.690 | - |" in report
    assert "| teacher-answers | 30.9s | - | - | - | - | - |" in report
    assert "| SFT answer-format accuracy | 97% | >= 95% | yes |" in report
    assert "| DPO held-out preference accuracy | 70% -> 78% | >= 80% | **no (shortfall)** |" in report
    assert ("| GRPO arithmetic exact-match gain | 5.0% -> 16.0% (+11.0 points; answers that show their steps "
            "10% -> 90%) | >= +10 points | yes |") in report
    # The distilled student (2.0) closes (2.5 - 2.0) / (2.5 - 1.0) = 33% of the plain student's gap.
    assert "| 33% (1.00 / 2.50 / 2.00) | >= 50% | **no (shortfall)** |" in report
    assert (tmp_path / "report" / "02-sft.png").stat().st_size > 1000
    assert "- **user:** What is 2 plus 2?" in report and "**nanomind:** 4" in report


def test_an_answer_shows_its_steps_with_two_equations_outside_its_reasoning():
    worked = "First add the tens: 47 + 30 = 77. Then add the ones: 77 + 8 = 85. So 47 + 38 = 85."
    assert shows_steps(worked) and shows_steps("<think>\n\n</think>\n\n" + worked)
    assert not shows_steps("47 + 38 = 85. The answer is 85.")
    assert not shows_steps(f"<think>\n{worked}\n</think>\n\n47 + 38 = 85.")  # worked out in its reasoning only
