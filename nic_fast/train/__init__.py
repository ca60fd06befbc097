"""Training on compressed stores: one module per stage.

data (slide table, folds) → sampler (crop centres ∝ distance to background) and reader
(fast window reads from a store) → loader (DALI or PyTorch, identical crops per seed) →
model (the NIC CNN) → fit (cross-validated training, checkpoints, logs) → evaluate
(test-time augmentation, metrics with bootstrap intervals) → gradcam (heatmaps and their
Jaccard index against a lesion mask).
"""
