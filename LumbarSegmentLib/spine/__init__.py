"""What a label map means anatomically: levels named from the draft's bodies and discs, the
ordering check, and per-level measurements (the same code measures drafts and manual labels)."""
