"""LumbarSegmentLib: all of LumbarSegment's logic, importable without Qt or the Slicer app.

The flow, one step per module, each importing only the ones before it::

    io / dicom   file or DICOM folder  -> Volume (array + spacing + origin + direction)
    geometry     Volume                -> canonical sagittal stack, and exactly back
    models       the eight seed architectures (one builder)
    packages     model package (manifest + safetensors) and registry
    engine       stack -> model(s) -> probabilities -> label map on the input grid
    mrml         label map <-> Slicer segmentation node (scene and logics passed in)
    cases        exported case (image + label + case.json): the contract with training/
"""
__version__ = "0.1.0"
