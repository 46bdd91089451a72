"""DeepLesion preprocessing: PNG -> NIfTI -> 1 mm -> 24-slice patches (SPEC section 2)."""
