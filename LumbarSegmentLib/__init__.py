"""LumbarSegmentLib: all of LumbarSegment's logic, importable without Qt, trame or the Slicer app.

The flow, each step importing only the ones before it (docs/architecture.md; enforced by the
import-linter contracts in ``.importlinter``)::

    volume, files, schema          the value types and the one value<->channel conversion
    io / dicom / geometry          file or DICOM folder -> Volume -> canonical sagittal stack, and back
    preprocess, models, packages   what a model sees; the eight seed networks; packages and registries
    devices, engine                THE prediction path: stack -> model(s) -> label map on the input grid
    cases, holdout                 exported case (image + label + case.json): the contract with training
    training/                      dataset -> training -> evaluation through the engine -> package
    mrml_*, jobs, slicer_logic     Slicer segmentation nodes, background jobs, module logic
    cli                            ``lumbarseg``
"""
__version__ = "0.1.0"
