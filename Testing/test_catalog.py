"""Model identity across registries (no shadowing), the frozen held-out split, and the publish gate.

The gate's evaluation itself (``evaluate.evaluate_packages``, the engine's path) runs for real in
test_full_loop.py; here it is replaced by a recorder so the gate's decisions are checked quickly.
"""
import json

import numpy as np
import pytest

from conftest import make_package
from LumbarSegmentLib.dataset.cases import write_case
from LumbarSegmentLib.dataset.holdout import HOLDOUT_FILE, frozen_split, set_holdout
from LumbarSegmentLib.registry.package import PackageError, read_package
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.catalog import Catalog, resolve_model
from LumbarSegmentLib.core.volume import Volume


@pytest.fixture()
def registries(tmp_path):
    """A read-only "shipped" registry holding uvd-tiny@1 (its default) and an empty user registry."""
    shipped = Registry(tmp_path / "shipped")
    shipped.publish(make_package(tmp_path / "src", name="uvd-tiny"), make_default=True, catalog=Catalog([shipped]))
    return Registry(tmp_path / "user"), Registry(tmp_path / "shipped", read_only=True)


def _fine_tune(tmp_path, parent, seed=5):
    pkg = make_package(tmp_path / f"ft{seed}", name=parent.name, seed=seed)
    manifest = json.loads((pkg.path / "manifest.json").read_text())
    manifest["parent"] = {"ref": parent.ref, "sha256": parent.sha256}
    (pkg.path / "manifest.json").write_text(json.dumps(manifest))
    return read_package(pkg.path)


def test_fine_tune_published_to_user_registry_never_shadows_the_shipped_ref(tmp_path, registries):
    user, shipped = registries
    cat = Catalog([user, shipped])
    shipped_pkg = cat.get("uvd-tiny@1")
    ft = _fine_tune(tmp_path, shipped_pkg)
    published = user.publish(ft, catalog=cat)
    assert published.ref == "uvd-tiny@2", "versions continue across registries, never restart at 1"
    assert published.parent == {"ref": "uvd-tiny@1", "sha256": shipped_pkg.sha256}
    entries = cat.entries()
    refs = [e.package.ref for e in entries]
    assert sorted(refs) == ["uvd-tiny@1", "uvd-tiny@2"] and len(set(refs)) == len(refs)
    assert [e.package.ref for e in entries if e.default] == ["uvd-tiny@1"], "exactly one default: the shipped one"
    assert {e.package.ref: e.source for e in entries}["uvd-tiny@1"].startswith("read-only")
    # the shipped ref still loads the shipped weights
    again = resolve_model("uvd-tiny@1", [user, shipped])
    assert again.path == shipped.root / "uvd-tiny" / "1" and again.sha256 == shipped_pkg.sha256
    assert resolve_model(None, [user, shipped]).ref == "uvd-tiny@1"
    assert resolve_model("uvd-tiny", [user, shipped]).ref == "uvd-tiny@1"  # bare name: the default's version


def test_a_colliding_ref_keeps_the_shipped_copy_and_sets_the_other_aside(tmp_path, registries):
    user, shipped = registries
    user.publish(make_package(tmp_path / "old", name="uvd-tiny", seed=9), make_default=True,
                 catalog=Catalog([user]))  # what an older LumbarSegment did: its own version 1
    cat = Catalog([user, shipped])
    entries = cat.entries()
    assert [e.package.ref for e in entries] == ["uvd-tiny@1"]
    assert entries[0].registry.root == shipped.root and entries[0].default
    assert [c.registry.root for c in cat.conflicts] == [user.root]
    assert resolve_model("uvd-tiny@1", [user, shipped]).path.parents[1] == shipped.root
    assert cat.next_version("uvd-tiny") == 2
    with pytest.raises(PackageError, match="no version 7"):
        cat.get("uvd-tiny@7")


def test_models_cli_lists_each_ref_once_with_one_default(tmp_path, monkeypatch, capsys):
    from LumbarSegmentLib.cli import main as cli


    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    default, nxt = _shipped_default_and_next()  # whatever the shipped default is today, and the next version
    shipped_pkg = resolve_model(default)  # the real shipped default
    user = Registry(tmp_path / "home" / "models")
    ft = _fine_tune(tmp_path, shipped_pkg)  # named uvd-starter: a fine-tune of the shipped default
    assert user.publish(ft, catalog=Catalog.around(user)).ref == nxt
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    refs = [r["ref"] for r in rows]
    assert len(refs) == len(set(refs)), refs
    assert [r["ref"] for r in rows if r["default"]] == [default]
    by_ref = {r["ref"]: r for r in rows}
    assert by_ref[default]["source"] == "shipped" and by_ref[nxt]["source"] == "user"
    assert by_ref[nxt]["parent"] == default
    assert resolve_model(default).sha256 == shipped_pkg.sha256


# --------------------------------------------------------------------------- held-out split
def _write_cases(folder, patients):
    image = Volume(np.zeros((4, 4, 2), np.int16))
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[1, 1, 1] = 1
    for i, p in enumerate(patients):
        write_case(folder, f"c{i:02d}", image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"], patient=p)


def test_frozen_split_holds_every_fourth_patient_and_never_moves_one(tmp_path):
    _write_cases(tmp_path, ["p1", "p2", "p3", "p4", "p5"])
    first = frozen_split(tmp_path)
    assert first.holdout_ids == ["c03"] and not first.enough
    assert (tmp_path / HOLDOUT_FILE).is_file()
    # new exports: earlier assignments stay, new patients continue the count
    image = Volume(np.zeros((4, 4, 2), np.int16))
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[0, 0, 0] = 1
    for i, p in enumerate(["a0", "a1", "a2", "p4"]):  # p4's second case is held out with it
        write_case(tmp_path, f"n{i}", image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"], patient=p)
    second = frozen_split(tmp_path)
    assert set(first.holdout_ids) <= set(second.holdout_ids)
    assert set(second.holdout_ids) == {"c03", "n3", "n2"}  # p4 (both cases) and the 8th patient, a2
    assert not set(second.train_ids) & set(second.holdout_ids)
    assert set_holdout(tmp_path, ["p1"]).holdout_ids == ["c00"]


# --------------------------------------------------------------------------- the gate
class _Recorder:
    """Stands in for evaluate_packages: records what was compared, returns chosen per-class Dice."""

    def __init__(self, candidate, current, level_range=None):
        self.scores = {"candidate": candidate, "current": current}
        self.level_range = level_range or {}
        self.calls = []

    def __call__(self, entries, cases, options=None, **kw):
        self.calls.append({name: [p.path for p in pkgs] for name, pkgs in entries.items()} | {
            "cases": [c.case_id for c in cases], "surface": kw.get("surface")})
        out = {}
        for name, pkgs in entries.items():
            dice = {cid: self.scores[name].get(cid, float("nan")) for cid in pkgs[0].schema.ids}
            fg = [v for k, v in dice.items() if k != "background" and v == v]
            out[name] = {"metrics": {"dice": dice, "iou": dice, "mean_dice_fg": float(np.mean(fg))},
                         "level_range": self.level_range.get(name, {})}
        return out


def _cases(folder, n):
    _write_cases(folder, [f"q{i}" for i in range(n)])
    from LumbarSegmentLib.dataset.cases import list_cases

    return list_cases(folder)


@pytest.mark.parametrize("n_cases, better, promoted", [(3, True, True), (3, False, False), (1, True, False)])
def test_gate_grades_against_the_model_in_use_on_unseen_cases(tmp_path, registries, monkeypatch, n_cases, better,
                                                                promoted):
    from LumbarSegmentLib.training import evaluate, publish

    user, shipped = registries
    in_use = Catalog([user, shipped]).default()
    rec = _Recorder({"vertebral_body": 0.8 if better else 0.6}, {"vertebral_body": 0.7})
    monkeypatch.setattr(evaluate, "evaluate_packages", rec)
    ft = _fine_tune(tmp_path, in_use)
    res = publish.publish_if_better(ft, user, cases=_cases(tmp_path / "data", n_cases),
                                    registries=[user, shipped])
    assert rec.calls and rec.calls[0]["current"] == [in_use.path], "compared with the model in use"
    assert res["default"] is promoted, res["reason"]
    assert res["ref"] == "uvd-tiny@2"
    row = res["comparison"]["per_class"]["vertebral_body"]
    assert row["current"] == pytest.approx(0.7) and row["delta"] == pytest.approx(0.1 if better else -0.1)
    assert "Vertebral body" in res["table"] or "vertebral_body" in res["table"]
    if n_cases < 2:
        assert "only 1 held-out case" in res["reason"]
    cat = Catalog([user, shipped])
    assert [e.package.ref for e in cat.entries() if e.default] == ["uvd-tiny@2" if promoted else "uvd-tiny@1"]


@pytest.mark.parametrize("other_source_drop, max_drop, promoted", [(0.05, 0.02, False), (0.01, 0.02, True),
                                                                   (0.05, None, True)])
def test_gate_refuses_a_candidate_that_forgets_another_source(tmp_path, registries, monkeypatch, other_source_drop,
                                                              max_drop, promoted):
    """Better on average (water-fat up) is not enough if another source falls by more than max_drop."""
    from LumbarSegmentLib.training import evaluate, publish

    user, shipped = registries
    in_use = Catalog([user, shipped]).default()
    levels = {"current": {"VB3": {"vertebral_body": 0.80}, "VB1": {"vertebral_body": 0.78}},
              "candidate": {"VB3": {"vertebral_body": 0.88}, "VB1": {"vertebral_body": 0.78 - other_source_drop}}}
    monkeypatch.setattr(evaluate, "evaluate_packages",
                        _Recorder({"vertebral_body": 0.85}, {"vertebral_body": 0.79}, levels))
    ft = _fine_tune(tmp_path, in_use)
    res = publish.publish_if_better(ft, user, publish.GatePolicy(max_drop=max_drop),
                                    cases=_cases(tmp_path / "data", 3), registries=[user, shipped])
    assert res["default"] is promoted, res["reason"]
    assert res["comparison"]["per_source"]["VB1"]["vertebral_body"]["delta"] == pytest.approx(-other_source_drop)
    assert "VB1: Vertebral body" in res["table"]
    if not promoted:
        assert "loses more than 0.020 on VB1 vertebral_body -0.050" in res["reason"]


def test_gate_drops_cases_the_candidate_trained_on_and_force_overrides(tmp_path, registries, monkeypatch):
    from LumbarSegmentLib.training import evaluate, publish

    user, shipped = registries
    in_use = Catalog([user, shipped]).default()
    rec = _Recorder({"vertebral_body": 0.9}, {"vertebral_body": 0.7})
    monkeypatch.setattr(evaluate, "evaluate_packages", rec)
    ft = _fine_tune(tmp_path, in_use)
    manifest = json.loads((ft.path / "manifest.json").read_text())
    manifest["training"]["train_cases"] = ["c00", "c01"]
    from LumbarSegmentLib.registry.manifest import seal

    (ft.path / "manifest.json").write_text(json.dumps(seal(manifest)))  # the training cases are under the seal
    cases = _cases(tmp_path / "data", 3)
    res = publish.publish_if_better(read_package(ft.path), user, cases=cases, registries=[user, shipped])
    assert rec.calls[0]["cases"] == ["c02"] and not res["default"] and "only 1 held-out" in res["reason"]
    forced = publish.publish_if_better(read_package(ft.path), user, publish.GatePolicy(force=True), cases=cases,
                                       registries=[user, shipped])
    assert forced["default"] and forced["ref"] == "uvd-tiny@3"
    # forcing still grades, so the record says what was overridden
    assert forced["reason"].startswith("forced; the gate said: mean_dice_fg") and forced["comparison"]
    assert len(rec.calls) == 2
    # every publish leaves a line in the registry's log: ref, verdict, why
    lines = [json.loads(x) for x in (user.root / "publish_log.jsonl").read_text().splitlines()]
    assert [(e["ref"], e["default"]) for e in lines] == [("uvd-tiny@2", False), ("uvd-tiny@3", True)]
    assert "only 1 held-out" in lines[0]["reason"] and lines[1]["reason"].startswith("forced; the gate said")
    assert lines[1]["comparison"]["cases"] == ["c02"] and lines[1]["parent"]


def test_publish_under_another_name_continues_that_model_line(tmp_path):
    """A run trained under a working name is published as the next version of an existing line."""
    from conftest import make_package
    from LumbarSegmentLib.registry.registry import Registry

    reg = Registry(tmp_path / "reg")
    first = reg.publish(make_package(tmp_path / "a", name="line-a"), make_default=True, catalog=Catalog.around(reg))
    assert first.ref == "line-a@1"
    run_pkg = make_package(tmp_path / "b", name="working-name", seed=3)
    second = reg.publish(run_pkg, name="line-a", catalog=Catalog.around(reg))
    assert second.ref == "line-a@2" and second.name == "line-a"
    assert second.sha256 == run_pkg.sha256  # the same weights, the seal still holds
    second.verify()
    assert "working-name" not in reg.index()["models"]
    with pytest.raises(Exception, match="name"):
        reg.publish(run_pkg, name="../escape", catalog=Catalog.around(reg))


def _shipped_default_and_next() -> tuple[str, str]:
    """The shipped registry's default ref and the ref a fine-tune of it gets (versions never restart)."""
    from LumbarSegmentLib.registry.package import shipped_registry_root
    from LumbarSegmentLib.registry.registry import Registry

    shipped = Registry(shipped_registry_root(), read_only=True)
    default = shipped.default_ref()
    name = default.split("@")[0]
    return default, f"{name}@{max(int(v) for v in shipped.index()['models'][name]['versions']) + 1}"


def test_gate_on_level_range_dice_ignores_levels_nobody_labelled(tmp_path, registries, monkeypatch):
    """Strict Dice says the candidate is worse (it paints unlabelled levels); inside the labelled
    levels it is better: the level_range_dice gate promotes it, the default gate does not."""
    from LumbarSegmentLib.training import evaluate, publish

    user, shipped = registries
    in_use = Catalog([user, shipped]).default()
    levels = {"current": {"all": {"vertebral_body": 0.85}, "VB3": {"vertebral_body": 0.85}},
              "candidate": {"all": {"vertebral_body": 0.88}, "VB3": {"vertebral_body": 0.88}}}
    recorder = _Recorder({"vertebral_body": 0.80}, {"vertebral_body": 0.81}, levels)
    monkeypatch.setattr(evaluate, "evaluate_packages", recorder)
    ft = _fine_tune(tmp_path, in_use)
    strict = publish.publish_if_better(ft, user, cases=_cases(tmp_path / "data", 3), registries=[user, shipped])
    assert not strict["default"]
    ranged = publish.publish_if_better(ft, user, publish.GatePolicy(metric="level_range_dice"),
                                       cases=_cases(tmp_path / "data", 3), registries=[user, shipped])
    assert ranged["default"], ranged["reason"]
    assert ranged["comparison"]["per_class"]["vertebral_body"]["delta"] == pytest.approx(0.03)
    assert [c["surface"] for c in recorder.calls] == [(), ()], "the gate reads no surface Dice: it asks for none"
    with pytest.raises(PackageError, match="needs cases"):
        publish.compare(ft, in_use, None, metric="level_range_dice")


def test_a_registry_is_numbered_by_the_catalogue_it_is_used_with(registries, tmp_path, monkeypatch):
    """Registry.publish writes; the version comes from the catalogue (Catalog.around): after every
    registry of it, with the registry itself standing in for the one in its folder."""
    user, shipped = registries
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    assert [r.root for r in Catalog.around(user).registries] == [user.root]  # not a default registry: alone
    cat = Catalog.around(Registry(tmp_path / "user"), [user, shipped])
    assert cat.registries[1] is shipped and cat.registries[0] is not user and cat.registries[0].root == user.root
    assert cat.version_for("uvd-tiny", user) == 2 and Catalog.around(user).version_for("uvd-tiny", user) == 1
    with pytest.raises(PackageError, match="ghost@9"):
        cat.check_ensemble(["ghost@9"], "uvd-tiny@2")
    home_user = Registry(tmp_path / "home" / "models")
    around = Catalog.around(home_user)  # the user's registry: used with the shipped one
    assert around.registries[0] is home_user and around.registries[1].read_only
    with pytest.raises(TypeError):
        home_user.publish(read_package(shipped.root / "uvd-tiny" / "1"))  # no catalogue, no number
