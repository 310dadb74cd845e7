"""One-epoch functions behind the Trainer's four training loops."""
