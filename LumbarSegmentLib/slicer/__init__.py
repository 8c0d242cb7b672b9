"""Everything that knows MRML: the segmentation-node bridge, draft tracking and export, and the
background jobs and module logic the Slicer panel and the browser app drive."""
