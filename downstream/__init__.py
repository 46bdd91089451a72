"""What puts a pretrained encoder to work on labelled CT, in the order nnU-Net keeps:
`labelled` (datasets, splits, reading and the integrity check), `cache` (each case preprocessed
once), `patches` (training patches and whole volumes read from the cache), `metrics` (the loss,
Dice and the table) and `probe` (frozen evaluations of an encoder)."""
