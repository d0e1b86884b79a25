"""Recovery after conversion: layer-wise and end-to-end fine-tuning of a converted checkpoint."""
