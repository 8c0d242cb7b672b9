"""Replay: a fine-tune mixes a few shipped slices of the parent's own sources into every batch.

Fast: synthetic cases and a tiny model. What is checked: the batch share the replayed cases get,
which cases are replayed (the parent's sources, the schema's structures, no patient of the team),
that a fine-tune records what it replayed, and that the shipped set is disjoint from every case the
documentation's tables and the publish gate grade on.
"""
import json

import numpy as np
import pytest
import torch

from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.dataset.cases import list_cases, write_case
from LumbarSegmentLib.training.data import CaseSlices, PatchSampler, Replayed, replay_weights
from LumbarSegmentLib.training.replay import parent_sources, replay_cases, replay_root


def _case_slices(cid, source):
    img = torch.zeros(1, 32, 32)
    lab = torch.zeros(1, 32, 32, dtype=torch.uint8)
    lab[0, 8:20, 8:20] = 1
    return CaseSlices(case_id=cid, patient=cid, image=img, label=lab, annotated=torch.tensor([True, True, False]),
                      structures=("vertebral_body",), fg_slices=[0], source=source)


def test_replay_weights_give_the_replayed_cases_their_share_spread_over_sources():
    sources = ["T1L"] * 4 + ["VB3", "VB3", "VB1"]
    replayed = [False] * 4 + [True] * 3
    w = replay_weights(sources, replayed, 0.5, [1.0] * 7)
    assert sum(w) == pytest.approx(1.0)
    assert sum(w[:4]) == pytest.approx(0.5) and len(set(w[:4])) == 1
    assert w[6] == pytest.approx(0.25) and w[4] == w[5] == pytest.approx(0.125), "each source gets an equal share"
    assert replay_weights(sources, replayed, 0.0, [1.0] * 7)[4:] == [0.0, 0.0, 0.0], "share 0: never drawn"


def test_sampler_draws_the_replay_share_of_each_batch():
    data = [_case_slices(f"T1L_{i}", "T1L") for i in range(6)] + [_case_slices("VB3_r", "VB3"),
                                                                    _case_slices("VB1_r", "VB1")]
    s = PatchSampler(data, patch=16, balance="cases").replaying(Replayed(frozenset({"VB3_r", "VB1_r"}), 0.3))
    assert float(s.case_weights[6:].sum()) == pytest.approx(0.3)
    plain = PatchSampler(data, patch=16, balance="cases")
    assert float(plain.case_weights[6:].sum()) == pytest.approx(2 / 8), "without replay every case counts alike"


def _write(folder, cid, structure, source, patient=None):
    img = Volume(np.random.default_rng(0).integers(20, 80, (24, 24, 2)).astype(np.int16))
    lab = np.zeros((24, 24, 2), np.uint8)
    lab[6:18, 6:18, :] = 1
    write_case(folder, cid, img, img.with_array(lab), labels={1: structure}, annotated_structures=[structure],
               patient=patient, extra={"source": source})


def test_replay_cases_follow_the_parents_sources_the_schema_and_the_teams_patients(tmp_path):
    folder = tmp_path / "replay"
    _write(folder, "VB3_01", "vertebral_body", "VB3")
    _write(folder, "IVD_11", "intervertebral_disc", "IVD")
    _write(folder, "SP_5", "vertebra", "SP")
    _write(folder, "VB1_07", "vertebral_body", "VB1", patient="P7")
    starter, spine6 = load_schema("starter"), load_schema("spine6")
    team = [c for c in list_cases(folder) if c.case_id == "VB1_07"]  # the team already holds patient P7
    ids = lambda cases: sorted(c.case_id for c in cases)  # noqa: E731
    assert ids(replay_cases(starter, None, team, folder)) == ["IVD_11", "VB3_01"], \
        "SPIDER's whole-vertebra label does not fit the starter schema; the team's own patient is not replayed"
    assert ids(replay_cases(spine6, None, (), folder)) == ["IVD_11", "SP_5", "VB1_07", "VB3_01"]
    assert ids(replay_cases(spine6, {"IVD"}, (), folder)) == ["IVD_11"], "only the parent's sources"
    with pytest.raises(FileNotFoundError, match="--replay 0"):
        replay_cases(starter, None, (), tmp_path / "nothing-here")


def test_parent_sources_are_the_prefixes_of_its_training_cases():
    assert parent_sources({"training": {"train_cases": ["VB3_01", "IVD_11", "VB3_02", "odd"]}}) == {"VB3", "IVD"}
    assert parent_sources({}) == set()


def test_finetune_replays_and_records_it(tmp_path, monkeypatch):
    """A real (tiny) fine-tune through ``training.finetune``: the replayed cases join the run, the
    manifest names them, and the sampler gives them their share."""
    from LumbarSegmentLib.training.config import TrainConfig
    from LumbarSegmentLib.training.finetune import finetune
    from LumbarSegmentLib.training.retention import RetentionSettings
    from LumbarSegmentLib.training.run_outputs import RunOutputs

    from LumbarSegmentLib.models import build_model
    from LumbarSegmentLib.registry.package import default_input_contract, write_package

    torch.manual_seed(0)
    parent = write_package(tmp_path / "parent", build_model("UVD", num_classes=3, init_filters=4).eval(),
                           name="uvd-tiny", schema=load_schema("starter"),
                           input_contract=default_input_contract(spacing_mm=(1.0, 1.0)),
                           training={"train_cases": ["VB3_01", "VB3_02"], "val_cases": []})
    replay, team = tmp_path / "replay", tmp_path / "team"
    _write(replay, "VB3_09", "vertebral_body", "VB3")
    _write(replay, "IVD_11", "intervertebral_disc", "IVD")  # a source the parent never trained on
    for i in range(2):
        _write(team, f"T1L_{i}", "vertebral_body", "T1L")
    seen = {}
    real_init = PatchSampler.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["sampler"] = self

    monkeypatch.setattr(PatchSampler, "__init__", spy)
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, patch=32, augment=False, threads=1, device="cpu",
                      precision="fp32", patience=0, warmup_steps=0)
    from LumbarSegmentLib.registry.package import read_package

    finetune(read_package(parent.path), list_cases(team), out_dir=tmp_path / "run", config=cfg,
             retention=RetentionSettings(replay=0.4, replay_set=str(replay)), outputs=RunOutputs(write_package=False))
    seen["weights"] = {c.case_id: float(w) for c, w in zip(seen["sampler"].data, seen["sampler"].case_weights)}
    assert seen["weights"]["VB3_09"] == pytest.approx(0.4) and "IVD_11" not in seen["weights"]
    assert seen["weights"]["T1L_0"] == pytest.approx(0.3)


def test_shipped_replay_set_is_disjoint_from_every_graded_case():
    from LumbarSegmentLib.training.reference import reference_cases

    cases = list_cases(replay_root()) if replay_root().is_dir() else []
    if not cases:
        pytest.skip(f"no replay set in {replay_root()}")
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "scripts" / "recipes"
    lumbar = json.loads((recipes / "lumbar-mr-split-v2.json").read_text())
    new = json.loads((recipes / "new-sources-split.json").read_text())["sources"]
    graded = set(lumbar["test"]) | set(lumbar["val"]) | {c for s in new.values() for c in s["test"] + s["val"]}
    replayed = {c.case_id for c in cases}
    assert not replayed & graded, "a replayed case would also grade the model"
    reference = {c.case_id for c in reference_cases()}
    assert replayed & reference <= {"IVD_11", "IVD_20"}, "only the disc source shares patients (other slices)"
    assert {c.extra.get("source") for c in cases} >= {"VB1", "VB2", "VB3", "IVD", "SP", "T1L"}
    assert sum(p.stat().st_size for p in replay_root().iterdir()) < 4 * 2**20, "the shipped set stays small"
    assert (replay_root() / "PROVENANCE.md").is_file()


def test_replay_on_the_command_line():
    from LumbarSegmentLib.training.cli import build_parser
    from LumbarSegmentLib.training.finetune import RETENTION_DEFAULT, retention_from_args

    p = build_parser()
    base = ["finetune", "--from", "x", "--data", "d", "--out", "o"]
    assert retention_from_args(p.parse_args(base)).replay == RETENTION_DEFAULT.replay
    assert retention_from_args(p.parse_args(base + ["--replay", "0.25"])).replay == 0.25
    assert p.parse_args(base + ["--replay-set", "cases"]).replay_set == "cases"
    for bad in ("1", "-0.1", "half"):
        with pytest.raises(SystemExit):
            p.parse_args(base + ["--replay", bad])


def test_a_replay_folder_without_cases_is_refused_before_anything_is_written(tmp_path):
    from LumbarSegmentLib.models import build_model
    from LumbarSegmentLib.registry.package import default_input_contract, write_package
    from LumbarSegmentLib.training.finetune import finetune
    from LumbarSegmentLib.training.retention import RetentionSettings

    parent = write_package(tmp_path / "parent", build_model("UVD", num_classes=3, init_filters=4).eval(),
                           name="uvd-tiny", schema=load_schema("starter"),
                           input_contract=default_input_contract(spacing_mm=(1.0, 1.0)),
                           training={"train_cases": ["VB3_01"], "val_cases": []})
    _write(tmp_path / "team", "T1L_0", "vertebral_body", "T1L")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no cases"):
        finetune(parent, list_cases(tmp_path / "team"), out_dir=tmp_path / "run",
                 retention=RetentionSettings(replay=0.5, replay_set=str(tmp_path / "empty")))
    assert not (tmp_path / "run").exists()
