"""Keyboard shortcuts of the annotation page: one table for the key handler, the help dialog and the docs.

The browser sends a key (``"Ctrl+z"``, ``"ArrowUp"``, ``"p"``...) and the view under the
mouse pointer; :func:`action_for` turns it into ``(action, argument)`` for the page. Keys
typed into a text field never arrive, nor arrows on a focused slider (the script below skips
them), so typing a number into "low" or moving a slider with the arrows does what it always does.
"""
from __future__ import annotations

# key -> (action, argument, what it does): the order is the order of the help dialog
SHORTCUTS: dict[str, tuple[str, object, str]] = {
    "Ctrl+z": ("undo", None, "undo the last edit"),
    "Ctrl+y": ("redo", None, "redo"),
    "Ctrl+Shift+z": ("redo", None, "redo"),
    "ArrowUp": ("slice", 1, "next slice in the view under the pointer (the sagittal view otherwise)"),
    "ArrowDown": ("slice", -1, "previous slice"),
    "PageUp": ("slice", 5, "5 slices on"),
    "PageDown": ("slice", -5, "5 slices back"),
    "Escape": ("tool", "none", "no tool: left-drag sets window/level"),
    "v": ("tool", "none", "no tool (view)"),
    "p": ("tool", "paint", "Paint"),
    "e": ("tool", "erase", "Erase"),
    "s": ("tool", "scissors", "Scissors"),
    "d": ("tool", "draw", "Draw"),
    "[": ("brush", -1, "smaller brush (1 mm)"),
    "]": ("brush", 1, "larger brush (1 mm)"),
    "-": ("brush", -1, "smaller brush"),
    "+": ("brush", 1, "larger brush"),
    "=": ("brush", 1, "larger brush"),
    "a": ("auto_wl", None, "automatic window/level"),
    "n": ("next_case", None, "next case to correct"),
    "?": ("help", None, "show these shortcuts"),
}

# what the help dialog and the user guide list (one line per distinct action)
HELP_ROWS = [("Ctrl+Z", "undo"), ("Ctrl+Y or Ctrl+Shift+Z", "redo"),
             ("Up / Down arrow", "next / previous slice in the view under the pointer"),
             ("Page Up / Page Down", "5 slices on / back"),
             ("V or Esc", "no tool: left-drag in a view sets window/level"),
             ("P, E, S, D", "Paint, Erase, Scissors, Draw"),
             ("[ and ] (or - and +)", "brush 1 mm smaller / larger"),
             ("A", "automatic window/level"), ("N", "next case to correct"), ("?", "this list")]


def action_for(key: str) -> tuple[str, object] | None:
    """``(action, argument)`` for a key as the browser names it, or ``None``."""
    found = SHORTCUTS.get(key) or (SHORTCUTS.get(key.lower()) if len(key) == 1 else None)
    return None if found is None else found[:2]


def key_script(trigger: str) -> str:
    """The page's key listener: keys of :data:`SHORTCUTS` go to the server trigger ``trigger``.

    Captured before the views see them (so a key never also reaches the remote view), skipped
    while the focus is in a text field or on a slider. The view under the pointer is the one
    whose overlay (``data-ls-view``) sits in the hovered view area.
    """
    import json

    keys = json.dumps(sorted(SHORTCUTS))
    return f"""
(function () {{
  if (window.__lumbarsegKeys) return;
  window.__lumbarsegKeys = true;
  const KEYS = new Set({keys});
  function hoveredView() {{
    for (const el of document.querySelectorAll('[data-ls-view]')) {{
      if (el.parentElement && el.parentElement.matches(':hover')) return el.dataset.lsView;
    }}
    return null;
  }}
  window.addEventListener('keydown', function (ev) {{
    const t = ev.target;
    const tag = ((t && t.tagName) || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || tag === 'select' || (t && t.isContentEditable)) return;
    const onSlider = t && t.closest && t.closest('[role=slider], .v-slider');
    if (onSlider && /^(Arrow|Page|Home|End)/.test(ev.key)) return;  // the slider's own keys
    let key = ev.key;
    if (ev.ctrlKey || ev.metaKey) key = 'Ctrl+' + (ev.shiftKey ? 'Shift+' : '') + key.toLowerCase();
    else if (key.length === 1) key = key === key.toUpperCase() && key !== key.toLowerCase() ? key.toLowerCase() : key;
    if (!KEYS.has(key) || ev.altKey) return;
    if (document.querySelector('.v-overlay--active')) return;  // a dialog or menu is open: its keys
    ev.preventDefault();
    ev.stopPropagation();
    if (window.trame && window.trame.trigger) window.trame.trigger('{trigger}', [key, hoveredView()]);
  }}, true);
}})();
"""


__all__ = ["SHORTCUTS", "HELP_ROWS", "action_for", "key_script"]
