"""Personalised federated learning methods (the `personalized` track)."""
