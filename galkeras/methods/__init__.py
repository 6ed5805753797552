"""Noisy-label training methods: GAL's peers and their shared parts."""
