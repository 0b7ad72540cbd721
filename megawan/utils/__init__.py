"""Small helpers shared by tools, the trainer and tests."""
