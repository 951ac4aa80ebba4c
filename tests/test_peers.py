"""The peers the recipes train beside memopt (recipes/peers.py)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from memopt.recipes import cli, peers                              # noqa: E402


def test_together_steps_each_optimizer_and_a_scheduler_sets_every_group():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    together = peers.Together([torch.optim.Muon([a], lr=0.02), torch.optim.AdamW([b], lr=1e-3)])
    muon, adamw = torch.optim.Muon([a2], lr=0.02), torch.optim.AdamW([b2], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(together, lambda step: 0.5 ** step)
    for t in range(3):
        for p, q in ((a, a2), (b, b2)):
            p.grad = q.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(t))
        together.step()
        muon.step()
        adamw.step()
        scheduler.step()
        for group in muon.param_groups + adamw.param_groups:
            group["lr"] *= 0.5
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert [g["lr"] for g in together.param_groups] == [0.02 / 8, 1e-3 / 8]
    assert peers.peer_state_bytes(together) == 4 * (48 + 2 * 6) + 4   # momentum, m, v, step


def test_galore_torch_peer_projects_attention_and_mlp_weights(micro, tmp_path, capsys):
    pytest.importorskip("galore_torch")
    out = tmp_path / "g"
    assert cli.main(["train", "--optimizer", "peer-galore-torch", "--preset", "micro",
                     "--steps", "4", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_state_mb"] > 0 and summary["steps"] == 4
    from memopt.recipes.train import build_model
    model = build_model(micro, torch.device("cpu"), 0)
    plain, projected = peers.projected_groups(model, rank=8, update_proj_gap=10, scale=0.25)
    assert len(projected["params"]) == 7 * micro.layers          # q, k, v, o, gate, up, down
    assert projected["rank"] == 8 and projected["proj_type"] == "std"
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))


def test_a_missing_peer_or_an_unsupported_mode_is_one_line(micro, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(peers, "peer_available", lambda name: False)
        code = cli.main(["train", "--optimizer", "peer-fira", "--preset", "micro", "--steps",
                         "2", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install fira" in err[0]
    with pytest.raises(ValueError, match="--per-layer"):
        from memopt.recipes.train import Run, RunConfig
        Run(RunConfig(optimizer="peer-torch-muon", preset="micro", steps=2, device="cpu",
                      progress=False, per_layer=True))
