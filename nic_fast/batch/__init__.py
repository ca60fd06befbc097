"""Many slides: store names, per-slide claims and records, the summary, worker supervision."""
