"""LumbarSegmentLib: all of LumbarSegment's logic, importable without Qt, trame or the Slicer app.

Rooms by role, each importing only the rooms above it in this list (docs/architecture.md;
enforced by the import-linter contracts in ``.importlinter``)::

    models/      the eight seed networks (plain PyTorch modules)
    core/        Volume, canonical sagittal geometry, label schemas, terminology, files, progress
    formats/     volumes, DICOM, .seg.nrrd, DICOM SEG and previews in and out
    registry/    model packages (sealed manifests) and registries
    inference/   THE prediction path: stack -> model(s) -> label map on the input grid
    dataset/     exported cases (image + label + case.json) and the held-out split
    training/    dataset -> training -> evaluation through the engine -> package -> publish gate
                 (source in the repository's top-level ``training/`` folder, installed here)
    slicer/      MRML segmentation nodes, draft tracking, export, background jobs, module logic
    cli/         ``lumbarseg``
"""
__version__ = "0.1.0"
