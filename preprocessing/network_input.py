"""The network-input contract, one place for every path into the encoder: the DeepLesion
patches that pretraining reads and the labelled CT that fine-tuning, the probe and prediction
read. CT is clipped to HU_RANGE and divided by HU_SCALE (to [-1, 1]), in the DeepLesion
patches' anatomical orientation (nibabel axis codes PRETRAINING_AXCODES: depth to inferior,
then posterior, then the patient's left), depth first (docs/method.md, sections 2 and 7)."""

HU_RANGE = (-1024.0, 1024.0)  # the DeepLesion step clips before resampling; downstream clips after it
HU_SCALE = 1024.0  # the views and downstream inputs are HU / HU_SCALE
PRETRAINING_AXCODES = "PLI"  # nibabel codes of the DeepLesion patches (NIH's affine)
