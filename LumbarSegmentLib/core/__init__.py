"""Core types every other room builds on: the Volume (array + LPS geometry), the canonical
sagittal stack and its exact way back, label schemas and terminology, atomic file writes,
progress events, option checks and the torchrun plumbing. Imports nothing else of the Lib."""
