"""DeSD: self-supervised pretraining of 3D CT encoders by deep self-distillation (MICCAI 2022),
with fine-tuning and prediction.

The package, from the floor up (an import only runs to the same floor or below):
    preprocessing/  disk, the network-input contract, resampling, the DeepLesion and own-CT steps
    models/         the 3D ResNets, DINO heads, student and teacher, the segmentation network
    utils, loss, augment/        schedules, distributed set-up, the DeSD loss, the views
    dataset, downstream/         pretraining patches; labelled sets, metrics, probes, nnU-Net
    main_desd, finetune, predict, evaluate   the commands
    tools/          export, plots, tiny generated data
"""
