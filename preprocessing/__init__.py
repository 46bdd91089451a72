"""DeepLesion preprocessing: PNG -> NIfTI -> 1 mm -> 24-slice patches (docs/method.md, section 2)."""
