"""THE prediction path: preprocessing, windows, model runners, probabilities, across-slice
smoothing, optional BatchNorm adaptation, post-processing, devices and precision.
Users, validation and the publish gate all predict through ``engine.segment_volume``, with the
options of ``options.SegmentOptions`` (flags, ranges and messages of every front end in one place)."""
