"""Sharing a trained adapter: the model card, push to the Hub, the HTML report."""
