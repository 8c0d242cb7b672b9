"""Files in and out: volumes (NIfTI, NRRD, MHA, DICOM series), header checks before any voxel
is read, Slicer .seg.nrrd, DICOM SEG and the preview picture."""
