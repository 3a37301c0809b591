"""Training: data windows, optimizer groups and schedule, and the training loop (``rwkvkit train``)."""
