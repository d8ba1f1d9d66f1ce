"""nanochat-audio: a small, hackable, full-stack speech-aware chat model."""
