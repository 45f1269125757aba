#!/usr/bin/env bash
# Reduce ViT-Ti/16 with EViT keep 0.5, then move it back towards the unreduced model by
# distillation: train on 700 of the 1000 shared sample images, validate on the other 300.
# Run from the repository root with ../shared beside it. About 30 s per epoch on 2 idle CPU cores.
set -euo pipefail
SHARED=../shared/data
WEIGHTS=$SHARED/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth
IMAGES=$SHARED/images/imagenet-sample-images
OUT=${OUT:-runs}

vitprune apply vit_tiny_patch16_224 --checkpoint "$WEIGHTS" --method evit --keep 0.5 -o "$OUT/evit0.5" --force
# finetune's defaults are the measured recipe (docs/finetune.md): 8 epochs of feature + KL distillation
# of the norms and biases.
vitprune finetune "$OUT/evit0.5" --data "$IMAGES" --val-split 0.3 --workers 1 --threads 2 -o "$OUT/evit0.5-ft" --force
# Interrupted? The same command with --resume continues from $OUT/evit0.5-ft.partial/ (drop --force
# only if you want it to refuse to replace an existing $OUT/evit0.5-ft).
python -c "import vitprune; m = vitprune.load('$OUT/evit0.5-ft'); print(vitprune.plan_of(m).describe())"
