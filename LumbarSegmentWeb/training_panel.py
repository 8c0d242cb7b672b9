"""The Export and Retrain panel: the corrected case becomes a training case through the Lib
(``ModuleLogic.export`` -> ``mrml.export_case``), the model is fine-tuned on the exported cases, and the
publish gate's verdict is read from the run's progress file."""
from __future__ import annotations

import json
import time
from pathlib import Path

from LumbarSegmentLib.slicer.logic import Status

from .session_core import SessionCore, SessionError

NOTHING_CORRECTED = ("nothing was corrected: every segment is exactly what the model drafted. Exporting it "
                     "teaches the model nothing new; export anyway only if the draft is right as it is")


class TrainingPanel(SessionCore):
    """Export, retrain, and the gate's comparison of the new model with the current one."""

    def export(self, *, force: bool = False) -> dict:
        """Write the open case as a training case through the Lib; refuses an uncorrected draft unless ``force``.

        Returns ``{"case_id", "version", "json", "edited", "warning"}``; with nothing
        corrected and no ``force``, nothing is written and ``warning`` says why.
        """
        if self.seg_node is None or self.volume_node is None:
            raise SessionError("nothing to export: open a case and segment it first")
        edited = self.edited_segments()
        if not edited and not force:
            return {"case_id": self.case_id, "written": False, "edited": [], "warning": NOTHING_CORRECTED}
        self.save_draft()
        case = self.logic.export(self.volume_node, self.seg_node, self.worklist.dataset, self.case_id)
        return {"case_id": case.case_id, "written": True, "version": case.version, "json": str(case.json_path),
                "edited": list(case.extra.get("edited_structures") or edited),
                "warning": "" if edited else NOTHING_CORRECTED}

    @property
    def retraining(self) -> bool:
        return self.logic.trainer.running

    def start_retrain(self, base_model: str | None = None, extra_args=()) -> Path:
        """Fine-tune ``base_model`` (default: the model in use) on the exported cases in the work folder."""
        from LumbarSegmentLib.registry.catalog import resolve_model

        if not self.worklist.exported_ids():
            raise SessionError("no exported case yet: correct and export at least one case before retraining")
        base = base_model or str(resolve_model(None, self.registries).path)
        run = self.worklist.work / "training" / time.strftime("run-%Y%m%d-%H%M%S")
        self.retrain_run = self.logic.start_retrain(self.worklist.dataset, run, list(extra_args), base_model=base)
        return self.retrain_run

    def poll_retrain(self) -> Status:
        return self.logic.poll_retrain()

    def stop_retrain(self) -> None:
        self.logic.stop_retrain()

    def resume_retrain(self) -> None:
        """Continue the stopped run from its last checkpoint (the trainer's ``--resume``)."""
        self.logic.resume_retrain()

    def publish_comparison(self) -> dict | None:
        """The publish gate's verdict for the last run: ``{"ref", "default", "reason", "table", "rows"}``.

        Read from the run's JSON-lines progress file (the contract in
        ``LumbarSegmentLib.core.progress``), never scraped from console output.
        """
        if self.retrain_run is None:
            return None
        log = self.retrain_run / "progress.jsonl"
        last = None
        try:
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("event") == "publish":
                    last = rec
        except OSError:
            return None
        if last is None:
            return None
        comparison = last.get("comparison") or {}
        rows = [{"class": cid, "current": r.get("current"), "candidate": r.get("candidate"), "delta": r.get("delta")}
                for cid, r in (comparison.get("per_class") or {}).items()]
        return {"ref": last.get("ref"), "default": bool(last.get("default")), "reason": last.get("reason", ""),
                "table": last.get("table", ""), "rows": rows}
