"""The Cases panel: the model list, opening a worklist volume (with its saved draft) or an upload, and
the view's window/level."""
from __future__ import annotations

from pathlib import Path

from .session_core import SessionCore, SessionError
from .worklist import image_fingerprint


class CasesPanel(SessionCore):
    """Models offered, cases opened and closed, display of the open volume."""

    def model_choices(self) -> list[dict]:
        """``[{"title", "value"}]`` for the model picker, the default first (the Lib's catalogue).

        The values are package folders, not refs: the job runs in a child process that
        resolves refs in the default registries only, while ``--models`` may name another.
        """
        from LumbarSegmentLib.registry.package import PackageError
        from LumbarSegmentLib.registry.catalog import Catalog

        catalog = Catalog(self.registries)
        rows = []
        for label, ref in self.logic.model_choices():
            try:
                rows.append({"title": label, "value": str(catalog.get(ref).path)})
            except (PackageError, OSError, ValueError):
                continue
        return rows

    def offered_model(self, value) -> str | None:
        """``value`` if it is one of :meth:`model_choices` (``None``: the default); a client may not pick a folder."""
        if value in (None, ""):
            return None
        if not isinstance(value, str) or value not in {c["value"] for c in self.model_choices()}:
            raise SessionError("that model is not one this server offers; pick one from the Model list")
        return value

    def load_case(self, case_id: str) -> list[str]:
        """Open a volume of the worklist (and its saved draft, if any) in the views; returns notes to show.

        A draft is opened only on the image it was drawn on (its fingerprint, stored with it);
        a draft of another image, or one that cannot be read, is moved to ``drafts/set-aside/``
        and the case opens without it, with a note saying so.
        """
        from LumbarSegmentLib.slicer import mrml
        from LumbarSegmentLib.formats.io import read_volume

        if self.segmenting:
            raise SessionError("a segmentation is running: cancel it before opening another case")
        path = self.worklist.volumes().get(case_id)
        if path is None:
            raise SessionError(f"no case {case_id!r} in the worklist")
        if self.volume_node is not None:
            self.save_draft()
        volume = read_volume(path)  # the Lib's reader: same geometry rules as the CLI and the Slicer module
        self._clear_case()
        self.volume_node = mrml.volume_to_node(self.app.scene, volume, case_id)
        self.case_id, self.fingerprint = case_id, image_fingerprint(volume)
        self.app.display_manager.show_volume(self.volume_node, do_reset_views=True)
        self.auto_window_level()
        info, notes = self.worklist.read_info(case_id), []
        draft = self.worklist.draft_path(case_id)
        if draft.is_file():
            if info.get("image_sha256") not in (None, self.fingerprint):
                aside = self.worklist.set_aside(case_id)
                notes.append(f"the saved draft of {case_id} was drawn on a different image, so it was not opened "
                             f"(moved to {aside}); segment the case again")
                info = {}
            else:
                try:
                    self._activate(mrml.load_seg_nrrd(self.app.scene, draft, f"{case_id} segmentation"))
                    self._restore_effort(info.get("effort"), info.get("effort_state"))
                except Exception as exc:  # noqa: BLE001 - any damage: set the file aside, keep the case usable
                    aside = self.worklist.set_aside(case_id)
                    notes.append(f"the saved draft of {case_id} could not be read ({exc}); it was moved to {aside} "
                                 f"and the case opened without it: segment it again")
                    info = {}
        self.last_run = info.get("run", {})
        return notes

    def _restore_effort(self, saved, state) -> None:
        """The effort already spent on this draft (saved with it) counts on, and the hand edits are still
        counted from the model's draft; a damaged record starts afresh."""
        try:
            self.logic.clicks.restore(self.seg_node, saved)
        except (TypeError, ValueError):
            pass
        if isinstance(state, dict):
            self.logic.effort.restore(self.seg_node, state)

    def upload(self, name: str, content: bytes) -> str:
        """Store an uploaded volume in the work folder and open it; returns its case id.

        The file is read before it is kept: one that is not a readable volume is refused and
        leaves nothing in ``uploads/`` or the worklist.
        """
        from LumbarSegmentLib.formats.io import read_volume

        from .worklist import case_id_for

        shown = Path(str(name)).name

        def check(path: Path) -> None:
            try:
                read_volume(path)
            except (ValueError, OSError, RuntimeError) as exc:
                raise SessionError(f"{shown}: not a readable volume, nothing was kept: "
                                   f"{str(exc).replace(str(path), shown)}") from None

        path = self.worklist.save_upload(shown, content, check=check)
        case_id = case_id_for(path)
        self.load_case(case_id)
        return case_id

    def _clear_case(self) -> None:
        for node in (self.seg_node, self.volume_node):
            if node is not None and node.GetScene() is not None:
                for i in range(node.GetNumberOfDisplayNodes()):
                    dn = node.GetNthDisplayNode(i)
                    if dn is not None:
                        self.app.scene.RemoveNode(dn)
                self.app.scene.RemoveNode(node)
        self.editor.deactivate_effect()
        self.logic.clicks.stop()  # the warm model belongs to the case being closed
        if self.seg_node is not None:
            self.logic.effort.forget(self.seg_node)  # saved with the draft file already
        self.effect = "none"
        self.undo_stack.clear()
        self.seg_node = self.volume_node = None
        self.case_id = self.fingerprint = None

    def auto_window_level(self) -> tuple[float, float]:
        from trame_slicer.core import VolumeWindowLevel

        lo, hi = VolumeWindowLevel.get_volume_auto_min_max_range(self.volume_node)
        window, level = VolumeWindowLevel.min_max_to_window_level(lo, hi)
        self.set_window_level(window, level)
        return window, level

    def set_window_level(self, window: float, level: float) -> None:
        from trame_slicer.core import VolumeWindowLevel

        if self.volume_node is None:
            raise SessionError("open a case first")
        VolumeWindowLevel.set_volume_node_window_level(self.volume_node, float(window), float(level))

    def window_level(self) -> tuple[float, float]:
        dn = self.volume_node.GetDisplayNode() if self.volume_node is not None else None
        return (float(dn.GetWindow()), float(dn.GetLevel())) if dn is not None else (0.0, 0.0)

    def intensity_range(self) -> tuple[float, float]:
        from trame_slicer.core import VolumeWindowLevel

        return VolumeWindowLevel.get_volume_scalar_range(self.volume_node) if self.volume_node else (0.0, 1.0)
