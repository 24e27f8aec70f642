"""Online distillation of drafters (OSD) from served traffic.

recipe     the trainer: setup / train / checkpoint / cleanup (start here)
losses     FKL, RKL, JSD(beta), OSD's 0.9/0.1 mix, TVD over one support, masked means
samples    events -> aligned samples, top-k + tail support, recency buffer, time-split hold-out
forward    a causal training forward over the decoder's own modules (equal to inference)
distill    one loss evaluation, teacher-forced evaluation, the promotion gate
idle       train in idle compute: heartbeats from Redis, preemption inside a step
router     prompt -> traffic domain (rules, online naive Bayes), JSON for serving
drift      served acceptance per domain: drift and collapse
checkpoint atomic checkpoints with sha256-checked weights
tracking   MLflow runs behind a protocol (NullTracker offline)
lineage    the MLflow registry: versions, champion/challenger, rollback
"""
