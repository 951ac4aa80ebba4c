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
    # weights, gradients, state, activations (1 x 256 tokens, checkpointing), peak in GB
    expected = {("adamw", "yes"): ["13.48", "0.26", "26.95", "0.17", "40.87"],
                ("adamw8bit", "yes"): ["13.48", "0.26", "13.69", "0.17", "27.60"],
                ("galore8bit", "yes"): ["13.48", "0.26", "7.58", "0.17", "21.49"],
                ("dct8bit", "yes"): ["13.48", "0.26", "3.82", "0.17", "17.74"],
                ("trion8bit", "yes"): ["13.48", "0.26", "2.18", "0.17", "16.09"]}
    assert list(rows) == list(expected)
    for key, numbers in expected.items():
        assert rows[key][3:8] == numbers, key
    assert rows[("galore8bit", "yes")][1] == "1024" and rows[("trion8bit", "yes")][1] == "1024"
    assert rows[("adamw", "yes")][1] == ""
    assert printed.startswith("LLaMA-7B: 6.74B parameters")
    assert "activations: batch 1 x 256 tokens, activation checkpointing" in printed
    assert "not included" not in printed.replace("workspaces are not included", "")


def test_readme_shows_what_the_7b_example_prints(capsys):
    pytest.importorskip("bitsandbytes")
    printed = estimate(README_7B.split()[1:], capsys)
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
        assert r["peak"] == (r["weights"] + r["gradients"] + r["optimizer_state"]
                             + r["activations"])
    assert rows[2]["optimizer_state"] < rows[0]["optimizer_state"]   # 8-bit moments
    assert rows[0]["rank"] == 32 and rows[4]["rank"] is None         # the preset's rank


def rows_of(argv, capsys, tmp_path):
    out = tmp_path / "rows.json"
    estimate(argv + ["--json", str(out)], capsys)
    return json.loads(out.read_text())


def test_int8_weights_count_codes_scales_and_update_temporaries(capsys, tmp_path):
    from memopt.optim.memory import UPDATE_FP32_COPIES
    common = ["estimate", "--model", "llama-60m", "--optimizers", "adamw,dct8bit", "--rank",
              "128", "--per-layer", "yes"]
    bf16 = rows_of(common, capsys, tmp_path)["rows"]
    saved = rows_of(common + ["--weights", "int8"], capsys, tmp_path)
    printed = estimate(common + ["--weights", "int8"], capsys)
    int8 = saved["rows"]
    assert saved["weights"] == "int8" and "INT8 linear weights" in printed
    assert "update temporaries GB" in printed
    for a, b in zip(bf16, int8):
        assert b["weights"] < a["weights"]
        assert b["update_temporaries"] == UPDATE_FP32_COPIES * 4 * 512 * 1376   # MLP matrix
        assert b["peak"] == (b["weights"] + b["gradients"] + b["optimizer_state"]
                             + b["activations"] + b["update_temporaries"])
    # memopt's state is declared per shape; torch AdamW's moments follow the fp32 weights
    assert int8[1]["optimizer_state"] == bf16[1]["optimizer_state"]
    assert int8[0]["optimizer_state"] > bf16[0]["optimizer_state"]


def test_activation_flags_reach_the_rows(capsys, tmp_path):
    common = ["estimate", "--model", "llama-130m", "--optimizers", "galore8bit"]
    base = rows_of(common, capsys, tmp_path)
    longer = rows_of(common + ["--seq-len", "1024", "--batch", "2"], capsys, tmp_path)
    full = rows_of(common + ["--checkpointing", "no"], capsys, tmp_path)
    assert (base["batch"], base["seq_len"], base["checkpointing"]) == (1, 256, "yes")
    assert (longer["batch"], longer["seq_len"]) == (2, 1024)
    row, long_row, full_row = base["rows"][0], longer["rows"][0], full["rows"][0]
    assert (row["batch"], row["seq_len"], row["checkpointing"]) == (1, 256, "yes")
    assert long_row["activations"] > 7 * row["activations"]        # 8x the tokens
    assert full_row["activations"] > 1.5 * row["activations"]     # 12 layers kept whole
    for r in (row, long_row, full_row):
        assert r["peak"] == (r["weights"] + r["gradients"] + r["optimizer_state"]
                             + r["activations"])
    assert base["activation_moment"] in ("backward_loss", "backward_layer")
    assert sum(base["activation_terms"].values()) == row["activations"]


def test_a_preset_brings_its_sequence_length(capsys, tmp_path):
    from memopt.recipes.presets import PRESETS
    saved = rows_of(["estimate", "--model", "tiny", "--optimizers", "adamw"], capsys, tmp_path)
    assert saved["seq_len"] == PRESETS["tiny"].seq_len == 128
    given = rows_of(["estimate", "--model", "tiny", "--optimizers", "adamw", "--seq-len",
                     "64"], capsys, tmp_path)
    assert given["seq_len"] == 64


@pytest.mark.parametrize("argv, flag", [
    (["--batch", "0"], "--batch"), (["--seq-len", "-3"], "--seq-len"),
    (["--seq-len", "long"], "--seq-len"), (["--checkpointing", "maybe"], "--checkpointing"),
    (["--weights", "int4"], "--weights"),
])
def test_bad_activation_and_weight_values_name_the_flag(capsys, argv, flag):
    try:
        code = cli.main(["estimate", "--model", "tiny", "--optimizers", "adamw"] + argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and flag in err, err


def test_a_config_without_llama_fields_is_refused_naming_the_model(capsys, tmp_path):
    from transformers import GPT2Config
    path = tmp_path / "config.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=2).to_json_file(str(path))
    try:
        code = cli.main(["estimate", "--model", str(path), "--optimizers", "adamw"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and "--model" in err and "intermediate_size" in err, err
