"""The pretraining views' augmentation: the intensity chain (`intensity`, per loader worker or
batched on the GPU) and its compiled CPU form (`native_chain`, built from `intensity.c`)."""
