"""LumbarSegment training: datasets of exported cases -> trained model packages. Knows nothing of Slicer."""
