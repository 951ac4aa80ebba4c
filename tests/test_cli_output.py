"""Where the command line writes: an --out it cannot use, a run it would overwrite and a
bench it cannot run are refused in one line (exit status 2) before anything is measured."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from test_cli import run_main                                         # noqa: E402

TRAIN = ["train", "--optimizer", "adamw", "--preset", "micro", "--steps", "2", "--device",
         "cpu", "--no-progress"]
COMPARE = ["compare", "--optimizers", "adamw", "--preset", "micro", "--steps", "2",
           "--device", "cpu", "--no-progress"]


def one_line(code, out, err, command, *parts):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith(f"memopt {command}: error: argument "), lines[0]
    assert "Traceback" not in err and "| " not in out
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv", [TRAIN, COMPARE], ids=["train", "compare"])
def test_out_that_is_a_file_is_refused(micro, capsys, tmp_path, argv):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code, printed, err = run_main(argv + ["--out", str(out)], capsys)
    one_line(code, printed, err, argv[0], "--out", str(out), "file")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("argv", [TRAIN, COMPARE], ids=["train", "compare"])
def test_out_that_cannot_be_written_is_refused(micro, capsys, argv):
    code, printed, err = run_main(argv + ["--out", "/proc/x"], capsys)
    one_line(code, printed, err, argv[0], "--out", "/proc/x")


def test_train_into_a_run_folder_needs_resume_or_overwrite(micro, capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_main(TRAIN + ["--out", str(out)], capsys)
    assert code == 0, err
    checkpoint = (out / "checkpoint.pt").read_bytes()
    code, printed, err = run_main(TRAIN + ["--steps", "3", "--out", str(out)], capsys)
    one_line(code, printed, err, "train", "--out", "--resume", "--overwrite")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    code, _, err = run_main(TRAIN + ["--steps", "3", "--out", str(out), "--overwrite"], capsys)
    assert code == 0, err
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] \
        == [1, 2, 3]                                     # the old run's log is gone
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def test_overwrite_and_resume_exclude_each_other(micro, capsys, tmp_path):
    code, printed, err = run_main(TRAIN + ["--out", str(tmp_path), "--resume", "--overwrite"],
                                  capsys)
    one_line(code, printed, err, "train", "--overwrite", "--resume")


def test_compare_into_an_earlier_comparison_says_it_replaces_it(micro, capsys, tmp_path):
    out = tmp_path / "cmp"
    assert run_main(COMPARE + ["--out", str(out)], capsys)[0] == 0
    code, printed, _ = run_main(COMPARE + ["--out", str(out)], capsys)
    assert code == 0 and f"replacing the comparison in {out}" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("projectors", [[], ["--projectors"]], ids=["step", "projectors"])
def test_bench_on_cuda_without_cuda_is_refused(capsys, projectors):
    code, printed, err = run_main(["bench", "--device", "cuda", *projectors], capsys)
    one_line(code, printed, err, "bench", "--device", "cuda")


def test_bench_only_a_name_that_matches_nothing_is_refused(capsys):
    code, printed, err = run_main(["bench", "--device", "cpu", "--only", "DCTAdamW,nosuch"],
                                  capsys)
    line = one_line(code, printed, err, "bench", "--only", "'nosuch'")
    assert "DCTAdamW'" not in line                       # only the key that matches nothing


def test_bench_out_that_is_a_folder_is_refused(capsys, tmp_path):
    code, printed, err = run_main(["bench", "--device", "cpu", "--only", "DCTAdamW8bit",
                                   "--out", str(tmp_path)], capsys)
    one_line(code, printed, err, "bench", "--out", "folder")
