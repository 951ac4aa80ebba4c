"""`memopt estimate`: the README's LLaMA-7B example, model given by name, shape or config.json."""

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from memopt.recipes import cli                                    # noqa: E402

#: The README's command, word for word.
README_7B = ("memopt estimate --model llama-7b --optimizers "
             "adamw,adamw8bit,galore8bit,dct8bit,trion8bit --rank 1024 --per-layer yes")


def table(printed: str) -> dict[tuple[str, str], list[str]]:
    """(optimizer, per-layer) -> the row's cells, from the printed markdown table."""
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "optimizer":
            rows[(cells[0], cells[2])] = cells
    return rows


def estimate(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_readme_7b_example(capsys):
    pytest.importorskip("bitsandbytes")
    printed = estimate(README_7B.split()[1:], capsys)
    rows = table(printed)
    # weights, gradients, state, peak in GB (1e9 bytes), as the README's memory table
    expected = {("adamw", "yes"): ["13.48", "0.26", "26.95", "40.69"],
                ("adamw8bit", "yes"): ["13.48", "0.26", "13.69", "27.43"],
                ("galore8bit", "yes"): ["13.48", "0.26", "7.58", "21.32"],
                ("dct8bit", "yes"): ["13.48", "0.26", "3.82", "17.56"],
                ("trion8bit", "yes"): ["13.48", "0.26", "2.18", "15.92"]}
    assert list(rows) == list(expected)
    for key, numbers in expected.items():
        assert rows[key][3:7] == numbers, key
    assert rows[("galore8bit", "yes")][1] == "1024" and rows[("trion8bit", "yes")][1] == "1024"
    assert rows[("adamw", "yes")][1] == ""
    assert printed.startswith("LLaMA-7B: 6.74B parameters")
    assert "activations" in printed and "not included" in printed
    # the README shows this command and, word for word, what it prints
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert README_7B in readme
    for line in printed.splitlines():
        assert line in readme, line


def test_shape_flags_and_config_file_equal_the_named_size(capsys, tmp_path):
    from transformers import LlamaConfig
    common = ["--optimizers", "adamw,galore,dct8bit", "--rank", "128", "--weights", "fp32"]
    named = table(estimate(["estimate", "--model", "llama-60m"] + common, capsys))
    shape = table(estimate(["estimate", "--hidden", "512", "--intermediate", "1376", "--layers",
                            "8", "--heads", "8", "--vocab", "32000"] + common, capsys))
    path = tmp_path / "config.json"
    LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, tie_word_embeddings=False).to_json_file(str(path))
    from_file = table(estimate(["estimate", "--model", str(path)] + common, capsys))
    assert named == shape == from_file
    assert len(named) == 3


def test_per_layer_counts_the_largest_gradient_and_bits_expand(capsys, tmp_path):
    out = tmp_path / "rows.json"
    estimate(["estimate", "--model", "tiny", "--optimizers", "galore,muon", "--bits", "32,8",
              "--per-layer", "both", "--weights", "fp32", "--json", str(out)], capsys)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["optimizer"], r["per_layer"]) for r in rows] == [
        (n, p) for n in ("galore", "galore8bit", "muon", "muon8bit") for p in ("no", "yes")]
    whole, layered = rows[0], rows[1]
    assert whole["gradients"] == whole["weights"]          # fp32 gradients of every weight
    assert layered["gradients"] == 352 * 128 * 4            # the largest matrix: an MLP one
    for r in rows:
        assert r["peak"] == r["weights"] + r["gradients"] + r["optimizer_state"]
    assert rows[2]["optimizer_state"] < rows[0]["optimizer_state"]   # 8-bit moments
    assert rows[0]["rank"] == 32 and rows[4]["rank"] is None         # the preset's rank
